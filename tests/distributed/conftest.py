"""Running real torchrun jobs from the tests: every process started is killed and reaped."""

from __future__ import annotations

import contextlib
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


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _stop(proc: subprocess.Popen[str]) -> None:
    """Kill the agent's process group and its workers' (torchrun starts each worker in a
    session of its own), then reap the agent; the workers, orphaned, are reaped by init."""
    workers = _children(proc.pid) if proc.poll() is None else []
    for group in [proc.pid, *workers]:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
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


# ------------------------------------------------------------ two agents: two machines
def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (for a rendezvous endpoint)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# An elastic job's rendezvous: a dead agent is dropped 4 s after its last
# keep-alive (torch sends one on each 1 s tick only when the last is older than
# 1 s, so they come 1 to 2 s apart: 2 s would now and then drop a live agent, and
# a newcomer then completes a round of its own), and a round closes 3 s after
# its minimum of agents joined (time for agents started together to join as one).
ELASTIC_RDZV = "keep_alive_interval=1,keep_alive_max_attempt=4,last_call_timeout=3"


def agent_cmd(
    port: int, run_id: str, host: bool, restarts: int = 3, nnodes: str = "2"
) -> list[str]:
    """One torchrun agent of a job of ``nnodes`` machines (1 process each), c10d rendezvous.

    ``host``: this agent hosts the rendezvous store (the machine at the
    endpoint, which must survive). Said explicitly: both agents run on this
    host, and a second agent left to guess would start a second store on the
    same port (SO_REUSEPORT) and split the rendezvous in two. A dead agent is
    noticed after 4 s without heartbeats (torch's default: 3 of 5 s; see
    :data:`ELASTIC_RDZV` for why not 2).
    ``nnodes``: ``"2"``, or ``"1:2"`` for an elastic job (:data:`ELASTIC_RDZV`).
    """
    conf = f"is_host={int(host)},keep_alive_interval=1,keep_alive_max_attempt=4"
    if ":" in nnodes:
        conf = f"is_host={int(host)},{ELASTIC_RDZV}"  # and a round closes soon
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={run_id}",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.1",
        f"--rdzv-conf={conf}",
    ]


# torch 2.13's agents share their rendezvous store with the workers by default,
# and then an agent that joins a running job never completes the rendezvous:
# the surviving rank-0 agent publishes MASTER_ADDR only in the first round
# (dynamic_rendezvous.next_rendezvous keeps its _bootstrap_store_info) while
# the newcomer waits for it. Opting out rebuilds it every round.
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def start_agent(
    args: Sequence[str | os.PathLike[str]],
    *,
    port: int,
    run_id: str,
    log: Path,
    host: bool,
    env: dict[str, str] | None = None,
    nnodes: str = "2",
) -> subprocess.Popen[str]:
    """Start one agent (and its worker) in its own process group, its output to ``log``.

    Stop it with :func:`stop` (or :func:`finish`): its whole group is killed and reaped.
    """
    with open(log, "ab") as f:
        return subprocess.Popen(
            agent_cmd(port, run_id, host, nnodes=nnodes) + [os.fspath(a) for a in args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=_env({**AGENT_ENV, **(env or {})}),
            start_new_session=True,
            text=True,
        )


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGKILL an agent's whole process group (its workers too) and reap it."""
    _stop(proc)


def finish(procs: Sequence[subprocess.Popen[str]], timeout: float) -> list[int | None]:
    """Wait for every agent (up to ``timeout`` in all), then kill what is left; the codes."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            _stop(p)
    return [p.returncode for p in procs]
