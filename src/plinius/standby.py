"""Warm standby: a spare training process that takes over within milliseconds of a crash.

A cold restart after a crash spends seconds before its first step: starting
Python, importing torch, loading the key, opening the sealed data, building the
model. A restore from the mirror takes milliseconds. A standby pair removes
the seconds: beside the training process a *spare* has already done all of it
and waits; when the trainer dies, the spare restores the last committed step
and carries on, and a new spare is prepared in the background.

Three roles, each a separate process::

    supervisor  (small: never imports torch, never loads the key)
     ├── trainer   the job's only writer of the mirror
     └── spare     prepared up to the restore, blocked in gate()

- The **supervisor** (:func:`supervise`, ``plinius train --standby``,
  ``python -m plinius.standby -- CMD...``) starts every worker as a fresh
  process (``subprocess``, never ``fork`` of a process that ran torch: a
  child forked after OpenMP regions ran can hang) and watches each through a
  pidfd. When the trainer dies of a signal (SIGKILL, an OOM kill, a crash) or
  exits with :data:`RESTARTABLE_EXIT`, it tells the spare to go.
- A **worker** runs the user's program. It calls :func:`gate` after its
  preparation and before it opens the mirror: outside a standby pair the gate
  returns at once; in a spare it reports ready and blocks until the
  supervisor says go (or exits quietly when the supervisor is gone).
- **One writer.** After go, the gate waits until the mirror's writer lock
  (an exclusive ``flock``, released by the kernel when its holder dies) is
  free: the supervisor reaped the old trainer, and the kernel agrees it holds
  nothing. Only then does the worker open the mirror, which takes the lock
  again; anyone else holding it (a ``plinius train`` started by hand in that
  moment) makes the takeover fail with a one-line error, never a second writer.

The control channel is a pair of pipes named in the environment variable
:data:`ENV`; messages are JSON lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, PliniusError, StorageError
from .job import EventLog

__all__ = [
    "ENV",
    "RESTARTABLE_EXIT",
    "Turn",
    "exit_code",
    "gate",
    "memory_of",
    "refuse_torchrun",
    "supervise",
    "warm_up",
]

ENV = "PLINIUS_STANDBY"  # "READ_FD,WRITE_FD" of a worker's control pipes
RESTARTABLE_EXIT = 75  # EX_TEMPFAIL: a worker's error a restart can fix
# A takeover whose trainer dies again before completing a step counts as a failure;
# this many in a row stop the job (a crash that every restart meets again).
MAX_FAILURES = 3
# How long a new trainer may run before the next spare starts if it never says
# it completed a step (a library user's program may not report it).
SPARE_DELAY_S = 2.0
# How long a spare waits for the writer lock after go before giving up.
LOCK_WAIT_S = 10.0
# Variables that say this process runs under torchrun (a rank of a process group).
_TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")


def refuse_torchrun(what: str = "--standby") -> None:
    """Refuse a standby pair under torchrun, which restarts its workers itself.

    Raises:
        ConfigError: A torchrun variable (``TORCHELASTIC_RUN_ID``, ``LOCAL_RANK``,
            ``WORLD_SIZE``) is set.
    """
    found = [v for v in _TORCHRUN_VARS if v in os.environ]
    if found:
        raise ConfigError(
            f"{what} cannot run under torchrun ({found[0]} is set): torchrun restarts every "
            f"rank itself; drop {what}, or run without torchrun"
        )


def memory_of(pid: int) -> dict[str, int]:
    """A process's memory from ``/proc/PID/smaps_rollup``, in bytes.

    Returns:
        ``rss`` (resident), ``pss`` (shared pages split among their users) and
        ``private`` (pages no other process maps: what the process alone
        costs); an empty dict where ``/proc`` cannot tell.
    """
    out: dict[str, int] = {}
    names = {"Rss:": "rss", "Pss:": "pss", "Private_Clean:": "private", "Private_Dirty:": "private"}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] in names:
                    k = names[parts[0]]
                    out[k] = out.get(k, 0) + int(parts[1]) * 1024
    except (OSError, ValueError):
        return {}
    return out


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.0f} MB"


# ---------------------------------------------------------------- the worker side

_turn_taken = False  # set once this worker passed the gate: its errors are a trainer's


@dataclass
class Turn:
    """What :func:`gate` returns to a worker that is to train.

    Attributes:
        previous_pid: The trainer this worker replaces (``None`` for the first).
        cause: How it ended (``"SIGKILL"``, ``"exit 75"``), or ``None``.
        died_at: When the supervisor saw it die (``time.time()``), or ``None``.
        go_at: When this worker was told to go (``time.time()``).
        lock_wait_s: Seconds spent waiting for the old writer's lock.
        prepared_s: Seconds from this process's start to the gate.
        waited_s: Seconds this worker waited, prepared, at the gate.
    """

    previous_pid: int | None
    cause: str | None
    died_at: float | None
    go_at: float
    lock_wait_s: float
    prepared_s: float
    waited_s: float
    _wfd: int = field(default=-1, repr=False)
    _stepped: bool = field(default=False, repr=False)

    @property
    def took_over(self) -> bool:
        """Whether this worker replaces a trainer that died (not the job's first)."""
        return self.previous_pid is not None

    def stepped(self) -> None:
        """Tell the supervisor this trainer completed a step (call after each; cheap).

        The first call lets the supervisor start the next spare (so its
        preparation does not compete with the restore) and resets its count
        of failures in a row.
        """
        if self._stepped:
            return
        self._stepped = True
        with contextlib.suppress(OSError):
            os.write(self._wfd, b'{"stepped": true}\n')

    def event_fields(self, step: int | None) -> dict[str, Any]:
        """The fields of a ``takeover`` event for a restore after ``step``."""
        now = time.time()
        return {
            "after_step": step,
            "previous_pid": self.previous_pid,
            "cause": self.cause,
            "died_at": self.died_at,
            "detect_s": None if self.died_at is None else self.go_at - self.died_at,
            "lock_wait_s": self.lock_wait_s,
            "since_death_s": None if self.died_at is None else now - self.died_at,
            "prepared_s": self.prepared_s,
        }


def _go_pending(rfd: int) -> bool:
    return bool(select.select([rfd], [], [], 0)[0])


def gate(
    mirror: str | os.PathLike[str] | None = None,
    *,
    warmup: Callable[[], None] | None = None,
) -> Turn | None:
    """Wait here, prepared, until this process must train (in a standby pair).

    Call it after everything a restart does up to the restore (imports, key,
    model, optimizer, dataset) and before the mirror is opened. Outside a
    standby pair (no :data:`ENV`) it returns ``None`` at once.

    In a worker of :func:`supervise`: run ``warmup`` (unless told to go
    already), report ready, block until the supervisor says go, then wait
    until ``mirror``'s writer lock is free (the old trainer is gone for the
    kernel too). When the supervisor goes away first, the process exits 0
    without having touched the mirror.

    Args:
        mirror: The mirror file the worker is about to open for writing.
        warmup: Optional work that makes the first step after a takeover fast
            (say :func:`warm_up`); it must leave no trace in the job's state.

    Returns:
        A :class:`Turn`, or ``None`` outside a standby pair.

    Raises:
        StorageError: The mirror's lock is still held :data:`LOCK_WAIT_S`
            seconds after go (a process other than the old trainer has it).
    """
    global _turn_taken
    spec = os.environ.pop(ENV, None)  # the worker's own children are no spares
    if not spec:
        return None
    rfd, wfd = (int(x) for x in spec.split(","))
    from .job import process_age_s

    prepared = process_age_s() or 0.0
    if not _go_pending(rfd):
        with contextlib.suppress(Exception):  # an optimisation only: never fatal
            if mirror is not None and Path(mirror).exists():
                from .pmem import Region

                # Mapped read-only, no lock, nothing read: the first mapping in a
                # process looks libpmem up (find_library runs ldconfig), 15 ms of
                # the first mirror open, paid here instead of after go.
                Region.open(mirror, readonly=True, populate=False).close()
            if warmup is not None:
                warmup()
    t_ready = time.time()
    try:
        os.write(wfd, json.dumps({"ready": True, "prepared_s": prepared}).encode() + b"\n")
        msg = _read_message(rfd)
    except KeyboardInterrupt:
        os._exit(130)  # Ctrl-C reached the whole group: the supervisor reports it
    if msg is None or not msg.get("go"):
        os._exit(0)  # the supervisor is gone or stops the job: nothing was touched
    go_at = time.time()
    t0 = time.perf_counter()
    if mirror is not None:
        _wait_for_writer_lock(Path(mirror))
    _turn_taken = True
    return Turn(
        previous_pid=msg.get("previous_pid"),
        cause=msg.get("cause"),
        died_at=msg.get("died_at"),
        go_at=go_at,
        lock_wait_s=time.perf_counter() - t0,
        prepared_s=prepared,
        waited_s=go_at - t_ready,
        _wfd=wfd,
    )


def _read_message(fd: int) -> dict[str, Any] | None:
    """One JSON line from ``fd`` (blocking), or ``None`` at end of file."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
    msg = json.loads(buf.split(b"\n", 1)[0])
    return msg if isinstance(msg, dict) else None


def _wait_for_writer_lock(path: Path) -> None:
    """Block until nobody holds ``path``'s writer lock (a missing file: nothing to wait for)."""
    from .mirror import exclusive_lock

    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        if not path.exists():
            return
        try:
            with exclusive_lock(path):
                return
        except StorageError:
            if time.monotonic() > deadline:
                raise StorageError(
                    f"{path} is still locked by another process {LOCK_WAIT_S:.0f} s after "
                    "the training process died, so the spare cannot take over; stop that "
                    "process (see /proc/locks) and run the job again"
                ) from None
        time.sleep(0.0005)


def exit_code(exc: BaseException, code: int) -> int:
    """The exit code of a worker failing with ``exc`` (the CLI's would be ``code``).

    A trainer of a standby pair exits with :data:`RESTARTABLE_EXIT` when a
    restart may fix the error (out of memory, an OS error, an unexpected
    exception), so that its spare takes over; a :class:`PliniusError` (bad
    input, integrity, key) or an interrupt keeps ``code``: a restart would
    meet it again. Anywhere else ``code`` is returned unchanged.
    """
    if not _turn_taken or isinstance(exc, PliniusError | KeyboardInterrupt):
        return code
    return RESTARTABLE_EXIT


def warm_up(
    module: Any,
    batch: Sequence[Any],
    loss_fn: Callable[[Any, Any], Any],
    prepare: Callable[[Any], Any] | None = None,
    split: Callable[[Any], tuple[Any, Any]] | None = None,
) -> None:
    """One forward and backward pass on a throwaway copy of ``module``.

    The first step of a fresh process is slower than the next ones (kernel
    selection, allocator growth); a spare pays that while it waits. The
    copy's gradients and statistics are discarded, and every random
    generator is put back as it was, so the job computes exactly what it
    would have without the warm-up.

    Args:
        module: The job's model (not modified).
        batch: A batch of the job's shape, one tensor per field.
        loss_fn: ``(output, target) -> loss``.
        prepare: Maps the input field to the model's input.
        split: Maps the batch to ``(input, target)``; default first and last field.
    """
    import copy

    from .rng import RNGState

    rng = RNGState()
    saved = rng.state_dict()
    try:
        twin = copy.deepcopy(module)
        twin.train()
        x, y = split(tuple(batch)) if split is not None else (batch[0], batch[-1])
        out = twin(prepare(x) if prepare is not None else x)
        loss_fn(out, y).backward()
        del twin, out
    finally:
        rng.load_state_dict(saved)


# ---------------------------------------------------------------- the supervisor


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def _restartable(code: int) -> bool:
    # Ctrl-C (exit 130, or death by SIGINT) is the user stopping the job.
    return (code < 0 and code != -signal.SIGINT) or code == RESTARTABLE_EXIT


class _Stopped(Exception):
    """SIGINT or SIGTERM reached the supervisor: stop the pair."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Worker:
    """One worker process and its control pipes, as the supervisor sees it."""

    def __init__(self, command: Sequence[str], env: dict[str, str]) -> None:
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()
        os.set_blocking(self.from_r, False)
        child_env = dict(env, **{ENV: f"{to_r},{from_w}"})
        try:
            self.proc = subprocess.Popen(list(command), env=child_env, pass_fds=(to_r, from_w))
        except OSError as exc:
            for fd in (to_r, from_w, self.to_w, self.from_r):
                os.close(fd)
            raise ConfigError(f"cannot start the training process {command[0]}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.close(to_r)
                os.close(from_w)
        self.pid = self.proc.pid
        self.pidfd = os.pidfd_open(self.pid)
        self.started = time.monotonic()
        self.buf = b""
        self.ready = False
        self.go_sent = False
        self.stepped = False
        self.eof = False

    def send(self, msg: dict[str, Any]) -> bool:
        try:
            os.write(self.to_w, json.dumps(msg).encode() + b"\n")
            return True
        except OSError:  # it died: its pipe is closed
            return False

    def messages(self) -> list[dict[str, Any]]:
        out = []
        try:
            while chunk := os.read(self.from_r, 4096):
                self.buf += chunk
            self.eof = True  # it exited (or closed the pipe): stop polling the pipe
        except (BlockingIOError, OSError):
            pass
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                m = json.loads(line)
                if isinstance(m, dict):
                    out.append(m)
        return out

    def reap(self) -> int:
        return self.proc.wait()

    def close(self, how: int | None = None) -> None:
        """Stop the worker (closing its pipe tells a waiting spare to exit) and reap it."""
        with contextlib.suppress(OSError):
            os.close(self.to_w)
        self.to_w = -1
        if self.proc.poll() is None and how is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, how)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.from_r, self.pidfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.from_r = self.pidfd = -1


def supervise(
    command: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    events: str | os.PathLike[str] | None = None,
    say: Callable[[str], None] = print,
    spare_delay_s: float = SPARE_DELAY_S,
) -> int:
    """Run ``command`` as a standby pair: a trainer, and a warm spare that takes over.

    ``command`` is the training program (``[sys.executable, "train.py"]``),
    which calls :func:`gate` before it opens its mirror. Every worker is a
    fresh process of it. The first is told to go at once; once it completed a
    step (or after ``spare_delay_s``), a spare starts and waits at the gate.
    When the trainer dies of a signal or exits with :data:`RESTARTABLE_EXIT`,
    the spare is told to go (one waiting prepared takes over in milliseconds;
    a spare still preparing goes as soon as it is ready; without one a new
    worker starts cold) and a new spare is started. :data:`MAX_FAILURES`
    trainers in a row dying before a step stop the job.

    This process never imports torch and never loads the key. SIGINT and
    SIGTERM stop the pair.

    Args:
        command: The worker's argv.
        env: The workers' environment (default: this process's).
        events: A JSON-lines events file to append the supervisor's events to
            (``standby_spare``, ``standby_ready``, ``standby_exit``).
        say: Where the supervisor's one-line reports go.
        spare_delay_s: See above.

    Returns:
        The job's exit status: 0 when the trainer completed it; else the
        failing trainer's exit code (it printed its error), or 1 after
        :data:`MAX_FAILURES` failures in a row (reported through ``say``).

    Raises:
        ConfigError: The command cannot be started, or pidfds are unavailable
            (Linux 5.3 and later).
    """
    if not hasattr(os, "pidfd_open"):
        raise ConfigError("--standby needs Linux 5.3 or later (pidfd_open)")
    base_env = dict(os.environ if env is None else env)
    base_env.pop(ENV, None)
    log = EventLog(Path(events) if events is not None else None)

    def on_signal(signum: int, _frame: object) -> None:
        raise _Stopped(signum)  # wakes the select below (PEP 475 would retry it)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer: _Worker | None = None
    spare: _Worker | None = None
    try:
        trainer = _Worker(command, base_env)
        trainer.send({"go": True})
        trainer.go_sent = True
        failures = 0
        went_at = time.monotonic()
        first_ready = True
        while True:
            fds = [w.pidfd for w in (trainer, spare) if w is not None]
            fds += [w.from_r for w in (trainer, spare) if w is not None and not w.eof]
            timeout = None
            if spare is None and not trainer.stepped:
                timeout = max(0.0, went_at + spare_delay_s - time.monotonic())
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            for m in trainer.messages():
                if m.get("stepped"):
                    trainer.stepped = True
                    failures = 0
            if spare is not None:
                for m in spare.messages():
                    if m.get("ready") and not spare.ready:
                        spare.ready = True
                        mem = memory_of(spare.pid)
                        log.write(
                            "standby_ready",
                            spare_pid=spare.pid,
                            ready_s=time.monotonic() - spare.started,
                            memory=mem,
                        )
                        if first_ready and not spare.go_sent:
                            first_ready = False
                            say(
                                f"standby: spare pid {spare.pid} ready in "
                                f"{time.monotonic() - spare.started:.1f} s; it costs "
                                f"{_mb(mem.get('rss'))} resident, {_mb(mem.get('private'))} "
                                "of it its own (model, optimizer, torch)"
                            )
            if spare is not None and spare.pidfd in readable and spare.proc.poll() is not None:
                code = spare.reap()
                log.write(
                    "standby_exit", role="spare", worker_pid=spare.pid, how=_describe_exit(code)
                )
                say(f"standby: the spare (pid {spare.pid}) died ({_describe_exit(code)}); "
                    "starting another")  # fmt: skip
                spare.close()
                spare = _Worker(command, base_env)
                log.write("standby_spare", spare_pid=spare.pid)
                continue
            if trainer.pidfd in readable and trainer.proc.poll() is not None:
                died_at = time.time()
                code = trainer.reap()
                how = _describe_exit(code)
                log.write("standby_exit", role="trainer", worker_pid=trainer.pid, how=how)
                trainer.close()
                if code == 0:
                    if spare is not None:
                        spare.close()
                    return 0
                if not _restartable(code):
                    if spare is not None:
                        spare.close(signal.SIGTERM)
                    return code
                failures = 0 if trainer.stepped else failures + 1
                if failures >= MAX_FAILURES:
                    if spare is not None:
                        spare.close(signal.SIGTERM)
                    say(
                        f"error: the training process failed {failures} times in a row without "
                        f"completing a step (last: {how}); the standby stopped; see the "
                        "errors above"
                    )
                    return 1
                if spare is None or spare.proc.poll() is not None:
                    if spare is not None:
                        spare.close()
                    spare = _Worker(command, base_env)  # both died: a cold start
                    log.write("standby_spare", spare_pid=spare.pid)
                previous = trainer.pid
                spare.send({"go": True, "previous_pid": previous, "cause": how, "died_at": died_at})
                spare.go_sent = True
                say(f"standby: the training process (pid {previous}) died ({how}); "
                    f"spare pid {spare.pid} takes over")  # fmt: skip
                trainer, spare = spare, None
                went_at = time.monotonic()
                continue
            if spare is None and (trainer.stepped or time.monotonic() >= went_at + spare_delay_s):
                spare = _Worker(command, base_env)
                log.write("standby_spare", spare_pid=spare.pid)
    except _Stopped as stop:
        for w in (trainer, spare):
            if w is not None:
                w.close(signal.SIGTERM)
        return 128 + stop.signum
    finally:
        for w in (trainer, spare):
            if w is not None and w.proc.poll() is None:
                w.close(signal.SIGKILL)
        for s, h in old.items():
            signal.signal(s, h)
        log.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m plinius.standby [--events FILE] -- CMD...``: run CMD as a standby pair."""
    args = list(sys.argv[1:] if argv is None else argv)
    events = None
    if args[:1] == ["--events"] and len(args) >= 2:
        events, args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0].startswith("-"):
        print("usage: python -m plinius.standby [--events FILE] -- CMD [ARGS...]", file=sys.stderr)
        return 2
    try:
        refuse_torchrun("plinius.standby")
        return supervise(args, events=events)
    except PliniusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
