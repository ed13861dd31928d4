"""Crash campaigns: run ``plinius train`` in a child process and SIGKILL it.

A campaign starts the same training command again and again; while crashes
remain, each run is killed with SIGKILL, either at a random moment (most while
training, some while starting up or restoring) or when a replayed spot-price
trace rises above the bid, as a preemptible cloud instance would be. The child
writes JSON-lines events (``plinius train --events``) that survive its death,
so the campaign knows where each run resumed, how long recovery took and which
losses it computed.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import ConfigError, PliniusError

__all__ = [
    "CampaignResult",
    "PricePoint",
    "PriceTrace",
    "RunRecord",
    "StepLoss",
    "describe_run",
    "mirror_differences",
    "read_events",
    "record_run",
    "run_campaign",
    "synthetic_trace",
    "wait_for_step",
]


class StepLoss(NamedTuple):
    """One training step a run computed, as its ``step`` event reported it."""

    step: int  # steps completed in the job (1-based)
    loss: float


class PricePoint(NamedTuple):
    """One point of a spot-price trace: from ``t`` seconds on, the price is ``price``."""

    t: float
    price: float


@dataclass
class RunRecord:
    """One run of the child process."""

    index: int
    killed: bool
    kill_after_s: float | None
    wall_s: float
    exit_code: int | None
    resumed_from: int | None = None
    recovery_s: float | None = None
    first_step_after_start_s: float | None = None
    steps: list[StepLoss] = field(default_factory=list)  # as computed, in order
    last_saved: int | None = None  # the last step whose save was started
    killed_at: float | None = None  # time.time() of the SIGKILL
    first_step_at: float | None = None  # time.time() of the run's first step event


def describe_run(run: RunRecord, previous: RunRecord | None = None) -> str:
    """One line on a run: where it started, how far it got, how it ended.

    A killed run's last steps may not have been committed yet (the save of a
    step is still in flight, or ``--mirror-every`` skipped it): the next run
    then resumes before the step the killed one reached, and says so.

    Args:
        run: The run.
        previous: The run before it, if any (the one killed before this resumed).

    Returns:
        E.g. ``run 2: resumed after step 137, the last committed step (step 138
        was not yet committed and is redone), reached step 200, finished``.
    """
    if run.resumed_from is None and run.recovery_s is None and run.killed and not run.steps:
        where = "killed during start-up, before its restore"
    elif run.resumed_from is None:
        where = "new job"
    else:
        where = f"resumed after step {run.resumed_from}, the last committed step"
        reached = previous.steps[-1].step if previous is not None and previous.steps else None
        if reached is not None and reached > run.resumed_from:
            lost = (
                f"step {reached} was"
                if reached == run.resumed_from + 1
                else f"steps {run.resumed_from + 1}-{reached} were"
            )
            where += f" ({lost} not yet committed and {'is' if ' was' in lost else 'are'} redone)"
    last = run.steps[-1].step if run.steps else "-"
    end = "killed" if run.killed else "finished" if run.exit_code == 0 else f"exit {run.exit_code}"
    return f"run {run.index + 1}: {where}, reached step {last}, {end}"


@dataclass
class CampaignResult:
    """All runs of a campaign, in order."""

    runs: list[RunRecord]

    @property
    def crashes(self) -> int:
        """How many runs were killed."""
        return sum(r.killed for r in self.runs)

    @property
    def finished(self) -> bool:
        """Whether the last run completed the job."""
        return bool(self.runs) and self.runs[-1].exit_code == 0


@dataclass
class PriceTrace:
    """A spot-price trace: ``(seconds, price)`` points, replayed with a time scale."""

    points: list[PricePoint]

    def __post_init__(self) -> None:
        self.points = [PricePoint(*p) for p in self.points]  # plain pairs are welcome too

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PriceTrace:
        """Read a CSV of ``seconds,price`` rows (a header row is allowed)."""
        pts: list[PricePoint] = []
        try:
            if not Path(path).is_file():  # a FIFO would block; a directory is no trace
                raise ConfigError(f"the price trace {path} is not a regular file")
            with open(path, newline="", encoding="utf-8") as f:
                for lineno, row in enumerate(csv.reader(f), start=1):
                    if not row or row[0].strip().startswith("#"):
                        continue
                    try:
                        t, price = float(row[0]), float(row[1])
                    except (ValueError, IndexError) as exc:
                        if lineno == 1:
                            continue  # a header
                        raise ConfigError(
                            f"{path}, line {lineno}: expected 'seconds,price', got {row!r}"
                        ) from exc
                    # nan compares false with everything: it would slip past
                    # the ordering check below and stall the replay.
                    if not (math.isfinite(t) and math.isfinite(price) and t >= 0):
                        raise ConfigError(
                            f"{path}, line {lineno}: times must be finite and non-negative "
                            f"and prices finite, got {row!r}"
                        )
                    pts.append(PricePoint(t, price))
        except OSError as exc:
            raise ConfigError(f"cannot read the price trace {path}: {exc.strerror}") from exc
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(f"the price trace {path} is not a CSV text file ({exc})") from exc
        if len(pts) < 2:
            raise ConfigError(f"the price trace {path} needs at least two points")
        if any(b.t <= a.t for a, b in itertools.pairwise(pts)):
            raise ConfigError(f"the price trace {path} must have increasing times")
        return cls(pts)

    def price_at(self, t: float) -> float:
        """The price in force at time ``t`` (step function)."""
        price = self.points[0].price
        for ts, p in self.points:
            if ts > t:
                break
            price = p
        return price

    def next_change(self, t: float, *, above: bool, bid: float) -> float | None:
        """The first time after ``t`` at which the price is above (or not above) ``bid``."""
        for ts, p in self.points:
            if ts > t and (p > bid) == above:
                return ts
        return None


def synthetic_trace(seed: int, duration_s: float, mean_gap_s: float) -> PriceTrace:
    """A deterministic synthetic spot-price trace around 1.0 with spikes above 1.2.

    Used when no real trace is given: price spikes (preemptions) arrive with
    exponential gaps of mean ``mean_gap_s`` and last a short while.
    """
    rng = random.Random(seed)
    pts = [PricePoint(0.0, 1.0)]
    t = 0.0
    while t < duration_s:
        t += rng.expovariate(1.0 / mean_gap_s)
        pts.append(PricePoint(t, 1.3 + rng.random() * 0.5))
        t += 0.2 + rng.random() * 0.4
        pts.append(PricePoint(t, 0.9 + rng.random() * 0.2))
    return PriceTrace(pts)


def read_events(path: Path, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON-lines events of a file, from a byte offset on.

    A line cut short by a SIGKILL is left for later (or ignored at the end);
    lines that are not events are skipped.

    Args:
        path: The events file (``plinius train --events``); a missing one holds none.
        start: The byte offset to read from (the offset a previous call returned).

    Returns:
        ``(events, offset)``: the events read, and the offset after the last
        complete line.
    """
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return [], start
    events = []
    consumed = 0
    for line in data.split(b"\n")[:-1]:
        consumed += len(line) + 1
        try:
            ev = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a torn line from a killed writer, followed by a new run's lines
        if isinstance(ev, dict) and isinstance(ev.get("event"), str):
            events.append(ev)
    return events, start + consumed


def wait_for_step(
    proc: subprocess.Popen[bytes], events: Path, offset: int, timeout: float, target: int = 0
) -> float | None:
    """Wait until the child logs a step >= ``target`` (any step for 0).

    Args:
        proc: The child (under torchrun: the agent, whose workers write the events).
        events: Its events file.
        offset: The byte offset from which its events count.
        timeout: The most seconds to wait.
        target: The step to wait for.

    Returns:
        The child's mean seconds per step so far, or None if it exited first.

    Raises:
        PliniusError: No such step within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    pos = offset
    first_step, first_t = -1, 0.0  # the first step logged, and when
    while time.monotonic() < deadline:
        evs, pos = read_events(events, pos)
        for e in evs:
            if e.get("event") != "step":
                continue
            step, t = int(e["step"]), float(e["t"])
            if first_step < 0:
                first_step, first_t = step, t
            if step >= target:
                n = step - first_step
                return (t - first_t) / n if n > 0 else 0.0
        if proc.poll() is not None:
            return None
        time.sleep(0.002)
    raise PliniusError(f"the training process logged no step {target} within {timeout:.0f} s")


def run_campaign(
    train_args: Sequence[str],
    *,
    events_path: Path,
    log_path: Path,
    crashes: int,
    seed: int = 0,
    window_s: tuple[float, float] = (0.2, 1.5),
    startup_kill_fraction: float = 0.2,
    trace: PriceTrace | None = None,
    bid: float = 1.2,
    time_scale: float = 1.0,
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
    on_run: Callable[[RunRecord], None] | None = None,
    total_steps: int | None = None,
) -> CampaignResult:
    """Run ``python -m plinius train *train_args`` until it completes, killing it ``crashes`` times.

    Random schedule (no ``trace``): a fraction ``startup_kill_fraction`` of
    the runs to be killed die at a random moment of start-up and restore; the
    others while training. With ``total_steps`` known, a target step is drawn
    so the kills spread over the job, and the run dies a random fraction of a
    step after reaching it (so kills land inside forward, backward, optimizer
    step and the background save alike); without it, after a delay drawn from
    ``window_s`` after the first logged step. Trace schedule: the run is
    killed when the replayed price rises above ``bid`` and restarted once it
    falls back (``time_scale`` compresses trace seconds into wall seconds);
    ``crashes`` caps the kills.

    Args:
        train_args: The ``plinius train`` options (key, data, mirror, model, steps, ...).
        events_path: Where the child appends its JSON-lines events (``--events``).
        log_path: Where the child's stdout and stderr are appended.
        crashes: The most runs to kill.
        seed: Seed of the random schedule.
        window_s: Random schedule without ``total_steps``: the range of delays
            after the first logged step.
        startup_kill_fraction: Random schedule: the fraction of kills aimed at
            start-up and restore.
        trace: A spot-price trace to replay instead of the random schedule.
        bid: Trace schedule: the run is killed while the price is above this.
        time_scale: Trace schedule: wall seconds per trace second.
        timeout_s: The most the whole campaign may take.
        env: The child's environment (default: this process's).
        on_run: Called with each :class:`RunRecord` as the run ends.
        total_steps: The job's total steps, to spread the kills over the job.

    Returns:
        A :class:`CampaignResult`: every run, in order.

    Raises:
        PliniusError: A run failed on its own (the message names the log), or
            the campaign ran past ``timeout_s``.
    """
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "plinius", "train", *train_args]
    cmd += ["--events", str(events_path), "--no-progress"]
    runs: list[RunRecord] = []
    clock0 = time.monotonic()
    deadline = clock0 + timeout_s
    startup_estimate = 2.0
    progress = 0  # the highest step any run has logged
    with open(log_path, "ab") as log:
        while True:
            if time.monotonic() > deadline:
                raise PliniusError(f"the crash campaign did not finish within {timeout_s:.0f} s")
            if trace is not None:
                # Wait (compressed) while the price is above the bid: no instance.
                t_trace = (time.monotonic() - clock0) / time_scale
                if trace.price_at(t_trace) > bid:
                    nxt = trace.next_change(t_trace, above=False, bid=bid)
                    if nxt is not None:
                        time.sleep(max(0.0, (nxt - t_trace) * time_scale))
            offset = events_path.stat().st_size if events_path.exists() else 0
            started = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
            try:
                kill_at: float | None = None
                if len([r for r in runs if r.killed]) < crashes:
                    if trace is not None:
                        t_trace = (started - clock0) / time_scale
                        nxt = trace.next_change(t_trace, above=True, bid=bid)
                        if nxt is not None:
                            kill_at = started + (nxt - t_trace) * time_scale
                    elif rng.random() < startup_kill_fraction:
                        kill_at = started + rng.uniform(0.0, startup_estimate)
                    elif total_steps is not None:
                        left = crashes - len([r for r in runs if r.killed])
                        span = max(1, (total_steps - progress) // (left + 1))
                        # At least two steps must remain after the target: the kill comes
                        # within one step's time of reaching it, and a job that finished
                        # first would leave the campaign a kill short.
                        last_target = max(1, total_steps - 2)
                        target = min(last_target, progress + rng.randint(1, 2 * span))
                        wait_s = max(1.0, min(120.0, deadline - time.monotonic()))
                        per_step = wait_for_step(proc, events_path, offset, wait_s, target)
                        if per_step is not None:
                            kill_at = time.monotonic() + rng.uniform(0.0, per_step)
                    else:
                        wait_s = max(1.0, min(120.0, deadline - time.monotonic()))
                        if wait_for_step(proc, events_path, offset, timeout=wait_s) is not None:
                            kill_at = time.monotonic() + rng.uniform(*window_s)
                killed = False
                killed_at = None
                if kill_at is not None:
                    while proc.poll() is None and time.monotonic() < kill_at:
                        time.sleep(0.002)
                    if proc.poll() is None:
                        killed_at = time.time()
                        proc.send_signal(signal.SIGKILL)
                        killed = True
                try:
                    code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired as exc:
                    proc.kill()
                    proc.wait()
                    raise PliniusError("the training process did not finish in time") from exc
            finally:
                # Never leave a child behind: it could go on writing the mirror.
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            evs, _ = read_events(events_path, offset)
            rec = record_run(len(runs), evs, started, killed, kill_at, code)
            rec.killed_at = killed_at
            if rec.first_step_after_start_s is not None:
                # Learn how long start-up and restore take from any run that got
                # that far, so start-up kills land inside them.
                startup_estimate = max(0.5, rec.first_step_after_start_s)
            if rec.steps:
                progress = max(progress, max(p.step for p in rec.steps))
            runs.append(rec)
            if on_run is not None:
                on_run(rec)
            if not killed:
                if code != 0:
                    raise PliniusError(
                        f"the training process failed with exit code {code}; see {log_path}"
                    )
                break
    return CampaignResult(runs)


def record_run(
    index: int,
    evs: list[dict[str, Any]],
    started: float,
    killed: bool,
    kill_at: float | None,
    code: int | None,
) -> RunRecord:
    """A :class:`RunRecord` of one run from the events it wrote.

    Args:
        index: The run's index in the campaign.
        evs: Its events (:func:`read_events`).
        started: When it started (``time.monotonic()``).
        killed: Whether it was killed.
        kill_at: When the kill was due (``time.monotonic()``), if one was.
        code: Its exit code (ignored for a killed run).
    """
    rec = RunRecord(
        index=index,
        killed=killed,
        kill_after_s=(kill_at - started) if kill_at is not None and killed else None,
        wall_s=time.monotonic() - started,
        exit_code=None if killed else code,
    )
    t_start = None
    for e in evs:
        kind = e.get("event")
        if kind == "start":
            t_start = e["t"] - (e.get("process_age_s") or 0.0)
        elif kind == "resumed":
            rec.resumed_from = e.get("step")
            rec.recovery_s = e.get("recovery_s")
        elif kind == "step":
            rec.steps.append(StepLoss(int(e["step"]), float(e["loss"])))
            if e.get("saved"):
                rec.last_saved = int(e["step"])
            if rec.first_step_at is None:
                rec.first_step_at = float(e["t"])
            if rec.first_step_after_start_s is None and t_start is not None:
                rec.first_step_after_start_s = e["t"] - t_start
    return rec


def mirror_differences(a: Path, b: Path, key: Any) -> list[str]:
    """The tensors that differ between two mirrors' committed states, bit for bit.

    A crash campaign ends with this against a run that was never interrupted:
    an exact resume leaves the list empty.

    Args:
        a: One mirror file.
        b: The other mirror file.
        key: The master key both were written under.

    Returns:
        The names of the tensors held by only one of them or differing in
        dtype, shape or any bit, sorted (those in only one first); empty when
        the two are identical.

    Raises:
        PliniusError: A mirror cannot be opened or fails authentication
            (:class:`~plinius.errors.IntegrityError`,
            :class:`~plinius.errors.WrongKeyError`, ...).
    """
    import torch

    from ..mirror import Mirror

    with Mirror(a, key, readonly=True) as ma, Mirror(b, key, readonly=True) as mb:
        ta, tb = ma.read_tensors(""), mb.read_tensors("")
    diffs = sorted(set(ta) ^ set(tb))
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            diffs.append(name)
            continue
        xb = x.contiguous().reshape(-1).view(torch.uint8)
        yb = y.contiguous().reshape(-1).view(torch.uint8)
        if not bool((xb == yb).all()):
            diffs.append(name)
    return diffs
