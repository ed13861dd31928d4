"""Kill campaigns against a standby pair, and the time each kill costs.

:func:`run_standby_campaign` starts ``plinius train --standby`` once and
SIGKILLs its *trainer* again and again (each time once a spare is ready),
optionally its spare or both. The time a kill costs is measured the same way
for a standby pair and for a cold restart (:func:`lost_times`,
:func:`cold_lost_times`): from the kill to the end of the first step
completed after it, minus one step's time (the step the kill interrupted has
to be done again either way). Every time is a wall-clock reading of the
events file (``time.time()`` of the writing process, the same clock in all).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PliniusError
from .crashtest import CampaignResult, RunRecord, StepLoss, read_events

__all__ = [
    "KINDS",
    "Kill",
    "StandbyCampaign",
    "as_runs",
    "cold_lost_times",
    "lost_times",
    "run_standby_campaign",
    "step_time",
    "summary",
]


@dataclass(frozen=True)
class Kill:
    """One SIGKILL of a campaign: when (``time.time()``), whom, and its role."""

    t: float
    pid: int
    role: str  # "trainer" or "spare"
    step: int  # the last step the trainer had logged


@dataclass
class StandbyCampaign:
    """What a standby campaign did: its kills, the supervisor's exit code, all events."""

    kills: list[Kill]
    exit_code: int | None
    events: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


class _State:
    """The pair as the events file tells it: the trainer, the ready spare, the last step."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.events: list[dict[str, Any]] = []
        self.trainer: int | None = None
        self.ready: int | None = None  # a spare that reported ready, not yet gone
        self.step = 0
        self.steps_since_ready = 0
        self.dead: set[int] = set()  # killed: events of theirs read late change nothing

    def poll(self) -> None:
        evs, self.offset = read_events(self.path, self.offset)
        for e in evs:
            self.events.append(e)
            kind = e.get("event")
            if int(e.get("pid", 0)) in self.dead or e.get("spare_pid") in self.dead:
                continue
            if kind == "step":
                self.trainer, self.step = int(e["pid"]), int(e["step"])
                self.steps_since_ready += 1
            elif kind == "standby_ready":
                self.ready, self.steps_since_ready = int(e["spare_pid"]), 0
            elif kind == "standby_exit" and e.get("worker_pid") == self.ready:
                self.ready = None
            elif kind == "takeover" and int(e["pid"]) == self.ready:
                self.trainer, self.ready = int(e["pid"]), None


KINDS = ("trainer", "trainer-now", "spare", "both")


def run_standby_campaign(
    train_args: Sequence[str],
    *,
    events_path: Path,
    log_path: Path,
    plan: Sequence[str],
    seed: int = 0,
    steps_between: tuple[int, int] = (2, 6),
    stop_after: bool = False,
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
    on_kill: Callable[[Kill], None] | None = None,
    allow_fewer: bool = False,
) -> StandbyCampaign:
    """Run ``plinius train --standby *train_args`` and SIGKILL its processes as ``plan`` says.

    Each entry of ``plan`` is one kill (:data:`KINDS`):

    - ``"trainer"``: once a spare reported ready and the trainer logged a
      random number of steps in ``steps_between`` after that, plus a random
      fraction of a step (so kills land in forward, backward, optimizer step
      and the background save alike), the trainer;
    - ``"trainer-now"``: the trainer, as soon as it logged a step, ready
      spare or not (right after a takeover: during the next spare's preparation);
    - ``"spare"``: the ready spare;
    - ``"both"``: the trainer and the ready spare together.

    Args:
        train_args: The ``plinius train`` options (key, data, mirror, model, steps, ...).
        events_path: The events file (``--events``).
        log_path: Where the processes' output is appended.
        plan: The kills, in order.
        seed: Seed of the schedule.
        steps_between: See ``"trainer"``.
        stop_after: Stop the job (SIGTERM to the supervisor) once a step
            followed the last kill, instead of waiting for it to finish.
        timeout_s: The most the campaign may take.
        env: The processes' environment.
        on_kill: Called after each kill.
        allow_fewer: A job that completes before every kill is no error (the
            campaign holds the kills made).

    Returns:
        The :class:`StandbyCampaign`.

    Raises:
        ConfigError: An unknown kind in ``plan``.
        PliniusError: The job ended before every kill (too few steps), failed,
            or the campaign ran past ``timeout_s``.
    """
    bad = [k for k in plan if k not in KINDS]
    if bad:
        raise ConfigError(f"unknown kill {bad[0]!r}; the kinds are {', '.join(KINDS)}")
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "plinius", "train", *train_args, "--standby"]
    cmd += ["--events", str(events_path), "--no-progress"]
    state = _State(events_path)
    state.offset = events_path.stat().st_size if events_path.exists() else 0
    kills: list[Kill] = []
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    with open(log_path, "ab") as log:
        # Its own session: the campaign can take down every process of the pair.
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            for kind in plan:
                if allow_fewer and proc.poll() is not None:
                    break
                if kind == "trainer-now":
                    seen = state.step
                    while state.trainer is None or state.step == seen:
                        _tick(proc, deadline, kills, len(plan))
                        state.poll()
                else:
                    wait = rng.randint(*steps_between) if kind == "trainer" else 0
                    while (
                        state.ready is None
                        or state.trainer is None
                        or state.steps_since_ready < wait
                    ) and not (allow_fewer and proc.poll() is not None):
                        _tick(proc, deadline, kills, len(plan), allow_fewer)
                        state.poll()
                    if allow_fewer and proc.poll() is not None:
                        break
                    if kind == "trainer":
                        time.sleep(rng.uniform(0.0, step_time(state.events) or 0.0))
                victims = {
                    "trainer": [("trainer", state.trainer)],
                    "trainer-now": [("trainer", state.trainer)],
                    "spare": [("spare", state.ready)],
                    "both": [("trainer", state.trainer), ("spare", state.ready)],
                }[kind]
                for role, pid in victims:
                    assert pid is not None
                    k = Kill(time.time(), pid, role, state.step)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    kills.append(k)
                    state.dead.add(pid)
                    if on_kill is not None:
                        on_kill(k)
                if kind != "spare":
                    state.trainer = None
                if kind != "trainer-now":
                    state.ready = None
            if stop_after:
                done = state.step
                while state.step <= done + 1 or state.trainer is None:
                    _tick(proc, deadline, kills, len(plan))
                    state.poll()
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise PliniusError("the standby job did not finish in time") from exc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the pair's workers too
            proc.wait()
    state.poll()
    if code != 0 and not (stop_after and code == 128 + signal.SIGTERM):
        raise PliniusError(f"the standby job failed with exit code {code}; see {log_path}")
    return StandbyCampaign(kills, code, state.events, time.monotonic() - t0)


def _tick(
    proc: subprocess.Popen[bytes],
    deadline: float,
    kills: list[Kill],
    planned: int,
    allow_fewer: bool = False,
) -> None:
    if proc.poll() is not None and not allow_fewer:
        raise PliniusError(
            f"the standby job ended after {len(kills)} kills of {planned} planned: "
            "give it more steps"
        )
    if time.monotonic() > deadline:
        raise PliniusError("the standby campaign ran past its time limit")
    time.sleep(0.002)


def step_time(events: list[dict[str, Any]]) -> float | None:
    """The median time between two consecutive steps of one process (its steady pace)."""
    last: dict[int, float] = {}
    gaps = []
    for e in events:
        if e.get("event") != "step":
            continue
        pid, t = int(e.get("pid", 0)), float(e["t"])
        if pid in last:
            gaps.append(t - last[pid])
        last[pid] = t
    return statistics.median(gaps) if gaps else None


def lost_times(campaign: StandbyCampaign) -> list[dict[str, float]]:
    """For each trainer kill: the time lost and its parts, in seconds.

    ``lost``: kill to the end of the first step after it, minus one step;
    ``detect``: kill to the supervisor seeing the death; ``resume``: kill to
    the new trainer's restore done (its ``takeover`` event).
    """
    step_s = step_time(campaign.events) or 0.0
    out = []
    for k in campaign.kills:
        if k.role != "trainer":
            continue
        later = [e for e in campaign.events if float(e["t"]) > k.t]
        first = next((e for e in later if e.get("event") == "step" and e["pid"] != k.pid), None)
        if first is None:
            continue
        seen = next(
            (e for e in later if e.get("event") == "standby_exit" and e.get("worker_pid") == k.pid),
            None,
        )
        took = next(
            (e for e in later if e.get("event") == "takeover" and e.get("previous_pid") == k.pid),
            None,
        )
        out.append(
            {
                "lost": float(first["t"]) - k.t - step_s,
                "detect": float(seen["t"]) - k.t if seen else float("nan"),
                "resume": float(took["t"]) - k.t if took else float("nan"),
                "step": step_s,
                "after_step": float(took["after_step"]) if took and took["after_step"] else 0.0,
            }
        )
    return out


def cold_lost_times(result: CampaignResult, step_s: float) -> list[float]:
    """For each kill of a cold-restart campaign: kill to the next run's first step, less a step."""
    out = []
    for run, nxt in zip(result.runs, result.runs[1:], strict=False):
        if run.killed and run.killed_at is not None and nxt.first_step_at is not None:
            out.append(nxt.first_step_at - run.killed_at - step_s)
    return out


def summary(xs: Sequence[float]) -> dict[str, float]:
    """``n``, ``median`` and ``worst`` (max) of a sample, in its unit (NaN when empty)."""
    nan = float("nan")
    return {
        "n": float(len(xs)),
        "median": statistics.median(xs) if xs else nan,
        "worst": max(xs) if xs else nan,
    }


def as_runs(campaign: StandbyCampaign) -> CampaignResult:
    """A standby campaign as the runs of a crash campaign: one per trainer, in order.

    A run's ``resumed_from`` is the step its ``takeover`` restored, its
    ``recovery_s`` the time from the old trainer's death to that restore.
    """
    killed = {k.pid for k in campaign.kills if k.role == "trainer"}
    runs: dict[int, RunRecord] = {}

    def run_of(pid: int) -> RunRecord:
        if pid not in runs:
            dead = pid in killed
            runs[pid] = RunRecord(len(runs), dead, None, 0.0, None if dead else 0)
        return runs[pid]

    for e in campaign.events:
        kind, pid = e.get("event"), int(e.get("pid", 0))
        if kind == "takeover":
            rec = run_of(pid)
            rec.resumed_from = e.get("after_step")
            rec.recovery_s = e.get("since_death_s")
        elif kind == "step":
            rec = run_of(pid)
            rec.steps.append(StepLoss(int(e["step"]), float(e["loss"])))
            if e.get("saved"):
                rec.last_saved = int(e["step"])
            if rec.first_step_at is None:
                rec.first_step_at = float(e["t"])
    for k in campaign.kills:
        if k.pid in runs:
            runs[k.pid].killed_at = k.t
    return CampaignResult(list(runs.values()))
