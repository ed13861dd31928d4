"""Running real torchrun jobs from the tests: every process started is killed and reaped."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("worker.py")


def torchrun_cmd(nproc: int, restarts: int = 0) -> list[str]:
    """``torchrun --standalone`` with ``nproc`` workers, as this interpreter runs it."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}",
    ]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def _stop(proc: subprocess.Popen[str]) -> None:
    """Kill the whole process group (agent and workers) and reap the agent."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    nproc: int,
    restarts: int = 0,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun ... ARGS`` to the end (or ``timeout``); its own process group."""
    cmd = torchrun_cmd(nproc, restarts) + [os.fspath(a) for a in args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(env),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _stop(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def worker_args(mirror: Path, key: Path, out: Path, *more: str) -> list[str]:
    return [str(WORKER), "--mirror", str(mirror), "--key", str(key), "--out", str(out), *more]


def result(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_campaign(
    args: Sequence[str | os.PathLike[str]],
    *,
    nproc: int,
    kills: int,
    pids: Path,
    seed: int,
    timeout: float = 400,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run a torchrun job and SIGKILL a random worker ``kills`` times at random moments.

    Each worker writes its pid to ``pids/<local rank>.pid`` once its first step
    of an incarnation is done; a kill waits until every worker of the new
    incarnation is there, then a random 0.05-0.6 s (steps and saves alike).

    Returns:
        The finished run and the number of kills made.
    """
    rng = random.Random(seed)
    cmd = torchrun_cmd(nproc, kills + 2) + [os.fspath(a) for a in args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env({"WORKER_PIDS": str(pids), **(env or {})}),
        start_new_session=True,
    )
    made = 0
    old: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while made < kills and proc.poll() is None and time.monotonic() < deadline:
            now = {}
            for f in pids.glob("*.pid"):
                try:
                    now[f.name] = int(f.read_text() or 0)
                except (ValueError, OSError):
                    pass
            fresh = [p for p in now.values() if p and p not in old and _alive(p)]
            if len(now) < nproc or len(fresh) < nproc:
                time.sleep(0.02)
                continue
            time.sleep(rng.uniform(0.05, 0.6))
            victim = rng.choice(fresh)
            if proc.poll() is None and _alive(victim):
                os.kill(victim, signal.SIGKILL)
                made += 1
            old.update(now.values())
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        _stop(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), made
