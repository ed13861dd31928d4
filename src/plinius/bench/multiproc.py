"""Crash campaigns under torchrun: ``plinius train`` in N processes, SIGKILL to one worker.

The campaign starts ``python -m torch.distributed.run --standalone
--nproc-per-node N --max-restarts K -m plinius train ...`` once. Its elastic
agent starts the N workers; the campaign SIGKILLs one of them (drawn at
random, never the agent) at a random moment, the agent stops the others and
starts a new group, which resumes from the mirror set. Each group is one
*run* of the campaign, as a restarted process is in a single-process one:
the workers' pids tell the groups apart, and rank 0's JSON-lines events say
what each group did. The agent starts in its own session and each worker in
its own (torchrun's choice): at the end every one of them is killed and the
agent reaped.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PliniusError
from .crashtest import CampaignResult, RunRecord, read_events, record_run, wait_for_step

__all__ = [
    "check_nproc",
    "job_failure",
    "run_to_end",
    "run_torchrun_campaign",
    "set_differences",
    "stop_job",
    "torchrun_command",
    "worker_pids",
]


def check_nproc(nproc: int, batch_size: int | None = None) -> None:
    """Refuse a process count this machine cannot run, or a batch it cannot split.

    Args:
        nproc: The processes asked for (``--nproc``).
        batch_size: The whole job's batch, if known.

    Raises:
        ConfigError: ``nproc`` is below 1 or above the machine's cores, or the
            batch does not divide by it.
    """
    cores = os.cpu_count() or 1
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: a job needs at least 1 process")
    if nproc > cores:
        raise ConfigError(
            f"--nproc {nproc} is more than this machine's {cores} cores: the processes would "
            f"share cores and time out in their collectives; use at most {cores}"
        )
    if batch_size is not None and batch_size % nproc:
        lower = batch_size - batch_size % nproc
        raise ConfigError(
            f"--batch-size {batch_size} (the whole job's batch) does not divide by --nproc "
            f"{nproc}; use a multiple of {nproc}, such as {lower or nproc}"
        )


def torchrun_command(
    nproc: int, max_restarts: int, args: Sequence[str], module: str = "plinius"
) -> list[str]:
    """The command line of ``python -m module *args`` under torchrun on this machine."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "--monitor-interval=0.1", "-m", module, *args,
    ]  # fmt: skip


def _state(pid: int) -> str:
    """The process's state letter (``Z``: a zombie), or ``""`` when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def worker_pids(agent_pid: int) -> list[int]:
    """The living children of the torchrun agent: its workers (``/proc``, Linux)."""
    pids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{agent_pid}/task")
    except OSError:
        return pids
    for task in tasks:
        try:
            with open(f"/proc/{agent_pid}/task/{task}/children", encoding="ascii") as f:
                pids += [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
    return sorted(p for p in set(pids) if _state(p) not in ("", "Z"))


def stop_job(agent: subprocess.Popen[bytes]) -> None:
    """Kill the agent and every worker, and reap the agent.

    The agent is stopped first, so that it starts no new worker while they
    die; the workers (each in its own session) are killed group by group, so
    that nothing they started survives; then the agent's group. The workers
    were the agent's children: once it is gone, init reaps them.
    """
    if agent.poll() is None:
        try:
            os.kill(agent.pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
        for pid in worker_pids(agent.pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()


def job_failure(what: str, logs: Sequence[Path]) -> PliniusError:
    """A benchmark's torchrun job failed: ``what``, then a worker's own error from ``logs``.

    A worker's error line, not the agent's report of its failure (``ChildFailedError``);
    else the logs' last lines.
    """
    lines = [ln for p in logs if p.exists() for ln in p.read_text(errors="replace").splitlines()]
    why = [ln for ln in lines if "Error: " in ln and "ChildFailedError" not in ln]
    return PliniusError(f"{what}: " + (why[-1].strip() if why else " | ".join(lines[-3:])))


def run_to_end(
    cmd: Sequence[str], log: Path, timeout_s: float, what: str, expect: Path | None = None
) -> None:
    """Run a torchrun job to its end, its output into ``log``; every process is stopped after.

    Raises:
        PliniusError: It timed out, failed, or did not write ``expect``
            (:func:`job_failure`, ``what`` naming the job).
    """
    with open(log, "wb") as f:
        agent = subprocess.Popen(list(cmd), stdout=f, stderr=f, start_new_session=True)
        try:
            code = agent.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_job(agent)
    if code != 0 or (expect is not None and not expect.exists()):
        raise job_failure(
            f"{what} " + ("timed out" if code is None else f"failed (exit {code})"), [log]
        )


def _new_group(
    agent: subprocess.Popen[bytes], seen: set[int], nproc: int, deadline: float
) -> list[int] | None:
    """Wait until the agent runs ``nproc`` workers none of which was seen; ``None``: it exited."""
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            return None
        fresh = [p for p in worker_pids(agent.pid) if p not in seen]
        if len(fresh) >= nproc:
            return fresh
        time.sleep(0.005)
    raise PliniusError("torchrun started no new group of workers in time")


def _group_ends(agent: subprocess.Popen[bytes], group: list[int], deadline: float) -> None:
    """Wait until every worker of ``group`` is gone (or the agent exited)."""
    while time.monotonic() < deadline and agent.poll() is None:
        if not any(_state(p) not in ("", "Z") for p in group):
            return
        time.sleep(0.005)


def run_torchrun_campaign(
    train_args: Sequence[str],
    *,
    nproc: int,
    events_path: Path,
    log_path: Path,
    crashes: int,
    seed: int = 0,
    startup_kill_fraction: float = 0.2,
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
    on_run: Callable[[RunRecord], None] | None = None,
    total_steps: int | None = None,
) -> CampaignResult:
    """Run ``plinius train *train_args`` under torchrun with ``nproc`` processes, killing workers.

    The schedule is :func:`~plinius.bench.crashtest.run_campaign`'s random
    one: some kills while a group starts up and restores, the others a random
    fraction of a step after a target step drawn so that the kills spread over
    the job (they land in forward, backward, the step gate and the saves
    alike). Each kill is a SIGKILL to one worker drawn at random; torchrun
    (``--max-restarts crashes + 1``) restarts the group.

    Args:
        train_args: The ``plinius train`` options (key, data, mirror set, model, steps, ...).
        nproc: Processes per group (``--nproc-per-node``).
        events_path: Where rank 0 appends its JSON-lines events.
        log_path: Where torchrun's and the workers' output is appended.
        crashes: The workers to kill (one per group).
        seed: Seed of the schedule and of the choice of worker.
        startup_kill_fraction: The fraction of kills aimed at start-up and restore.
        timeout_s: The most the whole campaign may take.
        env: The agent's environment (default: this process's).
        on_run: Called with each group's :class:`RunRecord` as it ends.
        total_steps: The job's total steps, to spread the kills over the job.

    Returns:
        A :class:`~plinius.bench.crashtest.CampaignResult`: one run per group.

    Raises:
        PliniusError: A group failed on its own (the message names the log), or
            the campaign ran past ``timeout_s``.
    """
    rng = random.Random(seed)
    args = ["train", *train_args, "--events", str(events_path), "--no-progress"]
    cmd = torchrun_command(nproc, crashes + 1, args)
    deadline = time.monotonic() + timeout_s
    runs: list[RunRecord] = []
    seen: set[int] = set()
    startup_estimate = 2.0
    progress = 0
    offset = events_path.stat().st_size if events_path.exists() else 0
    with open(log_path, "ab") as log:
        agent = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            while True:
                group = _new_group(agent, seen, nproc, deadline)
                if group is None:
                    break
                if runs and not runs[-1].killed:
                    raise PliniusError(
                        f"a group of training processes failed on its own and torchrun "
                        f"restarted it; see {log_path}"
                    )
                seen.update(group)
                started = time.monotonic()
                kill_at = _kill_moment(
                    rng, agent, events_path, offset, deadline, startup_estimate,
                    crashes - sum(r.killed for r in runs), progress, total_steps,
                    startup_kill_fraction,
                )  # fmt: skip
                killed = False
                if kill_at is not None:
                    while agent.poll() is None and time.monotonic() < kill_at:
                        time.sleep(0.002)
                    alive = [p for p in group if _state(p) not in ("", "Z")]
                    if agent.poll() is None and alive:
                        os.kill(rng.choice(alive), signal.SIGKILL)
                        killed = True
                if killed:
                    _group_ends(agent, group, deadline)
                else:
                    _group_ends_or_restarts(agent, group, seen, deadline)
                code = agent.poll()
                evs, offset = read_events(events_path, offset)
                rec = record_run(len(runs), evs, started, killed, kill_at, code)
                if rec.first_step_after_start_s is not None:
                    startup_estimate = max(0.5, rec.first_step_after_start_s)
                if rec.steps:
                    progress = max(progress, max(p.step for p in rec.steps))
                runs.append(rec)
                if on_run is not None:
                    on_run(rec)
                if code is not None:
                    break
            code = agent.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise PliniusError("the training processes did not finish in time") from exc
        finally:
            stop_job(agent)  # never leave a worker behind: it could go on writing the mirror
    if runs:
        runs[-1].exit_code = code
    if code != 0:
        raise PliniusError(f"the training processes failed with exit code {code}; see {log_path}")
    return CampaignResult(runs)


def _kill_moment(
    rng: random.Random,
    agent: subprocess.Popen[bytes],
    events_path: Path,
    offset: int,
    deadline: float,
    startup_estimate: float,
    left: int,
    progress: int,
    total_steps: int | None,
    startup_kill_fraction: float,
) -> float | None:
    """When to kill a worker of the group that just started (``None``: let it run)."""
    if left <= 0:
        return None
    now = time.monotonic()
    if rng.random() < startup_kill_fraction:
        return now + rng.uniform(0.0, startup_estimate)
    wait_s = max(1.0, min(120.0, deadline - now))
    target = 0
    if total_steps is not None:
        span = max(1, (total_steps - progress) // (left + 1))
        # Two steps must remain after the target: the kill comes within a step's time.
        target = min(max(1, total_steps - 2), progress + rng.randint(1, 2 * span))
    per_step = wait_for_step(agent, events_path, offset, wait_s, target)
    if per_step is None:
        return None
    return time.monotonic() + rng.uniform(0.0, per_step if total_steps else 1.0)


def _group_ends_or_restarts(
    agent: subprocess.Popen[bytes], group: list[int], seen: set[int], deadline: float
) -> None:
    """Wait for the agent to exit, or for a new group (one that failed on its own)."""
    while time.monotonic() < deadline and agent.poll() is None:
        if any(p not in seen for p in worker_pids(agent.pid)):
            return
        time.sleep(0.01)


def set_differences(a: Path, b: Path, key: Any, nproc: int) -> list[str]:
    """What differs, bit for bit, between two mirror sets' committed states, file by file.

    Args:
        a: One mirror set (a directory of ``local-N.plm``).
        b: The other.
        key: The master key both were written under.
        nproc: The processes that wrote them.

    Returns:
        ``local-N/NAME`` for each tensor that differs (see
        :func:`~plinius.bench.crashtest.mirror_differences`); empty when equal.
    """
    from ..dist import member_path
    from .crashtest import mirror_differences

    out: list[str] = []
    for r in range(nproc):
        diffs = mirror_differences(member_path(a, r), member_path(b, r), key)
        out += [f"local-{r}/{d}" for d in diffs]
    return out
