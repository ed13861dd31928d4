"""The mirror's lock dies with the process that took it (issue 18, item 3).

After a SIGKILL of a training script whose DataLoader workers were forked, the
orphaned workers live on for a while holding every descriptor they inherited.
A lock they inherited would keep the restarted job out ("in use by another
process"); it must be the killed process's alone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from plinius.crypto import MasterKey
from plinius.errors import ConfigError, StorageError
from plinius.mirror import Mirror, describe_file

_SRC = str(Path(__file__).resolve().parents[2] / "src")
_PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphans of this test's children become this process's children, to be reaped here."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:  # pragma: no cover
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is not available")
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # pragma: no cover
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # pragma: no cover - reaped by someone else
        pass


def _writer_with_forked_worker(
    path: Path, key: MasterKey, how: str
) -> tuple[subprocess.Popen[str], int]:
    """Start a process that opens ``path`` for writing, then forks a worker that sleeps.

    ``how``: ``"os.fork"`` or ``"multiprocessing"`` (DataLoader workers' way).
    Returns the process and the worker's pid.
    """
    kfile = path.with_suffix(".key")
    key.save(kfile)
    script = textwrap.dedent(
        f"""
        import multiprocessing, os, sys, time, torch
        from plinius.crypto import MasterKey
        from plinius.mirror import Mirror
        m = Mirror({str(path)!r}, MasterKey.load({str(kfile)!r}))
        m.save({{"w": torch.ones(3)}}, step=1)
        if {how!r} == "os.fork":
            pid = os.fork()
            if pid == 0:
                time.sleep(120)
                os._exit(0)
        else:
            p = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
            p.start()
            pid = p.pid
        print(pid, flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": _SRC},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:  # pragma: no cover - the script failed
        proc.wait(30)
        raise AssertionError(proc.stderr.read() if proc.stderr else "writer failed")
    return proc, int(line)


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_killed_writers_orphaned_workers_do_not_hold_the_lock(
    shm_dir: Path, key: MasterKey, subreaper: None, how: str
) -> None:
    path = shm_dir / "job.plm"
    proc, worker = _writer_with_forked_worker(path, key, how)
    try:
        with pytest.raises(StorageError, match="in use by another process"):
            Mirror(path, key)  # the writer is alive: refused
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        os.kill(worker, 0)  # the orphaned worker is still alive...
        t0 = time.monotonic()
        with Mirror(path, key) as m:  # ...and the restart opens the mirror at once
            t = {"w": torch.zeros(3)}
            assert m.restore(t) == 1 and t["w"].tolist() == [1.0, 1.0, 1.0]
            m.save(t, step=2)
        assert time.monotonic() - t0 < 10
        os.kill(worker, 0)
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
            proc.wait(30)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
        _kill_and_reap(worker)


def test_a_forked_child_cannot_take_over_its_parents_lock(shm_dir: Path, key: MasterKey) -> None:
    """A child forked while a mirror is open holds nothing: its parent's lock stays the
    parent's, and the mirror object it inherited refuses to save."""
    path = shm_dir / "job.plm"
    with Mirror(path, key) as m:
        m.save({"w": torch.ones(2)}, step=1)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.close(r)
                try:
                    Mirror(path, key)
                except StorageError as exc:
                    code = 0 if "in use" in str(exc) else 2
                try:
                    m.save({"w": torch.zeros(2)}, step=99)  # the parent's mirror, inherited
                    code = 3
                except ConfigError as exc:
                    code = code if "forked" in str(exc) else 4
                os.write(w, b"%d" % code)
            finally:
                os._exit(0)
        os.close(w)
        got = os.read(r, 8)
        os.close(r)
        os.waitpid(pid, 0)
        assert got == b"0", got  # the parent, alive, still excludes the child
        m.save({"w": torch.full((2,), 2.0)}, step=2)  # and still holds its mirror
    with Mirror(path, key, readonly=True) as m:
        assert m.info().generation == 2


def test_reading_the_header_in_the_same_process_keeps_the_lock(
    shm_dir: Path, key: MasterKey
) -> None:
    """Opening and closing the file elsewhere in the process (describe_file, a backup copy)
    never releases the lock (a POSIX record lock would be released)."""
    path = shm_dir / "job.plm"
    with Mirror(path, key) as m:
        m.save({"w": torch.ones(2)}, step=1)
        describe_file(path)
        path.read_bytes()
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _TRY_OPEN.format(path=str(path), kfile=str(_keyfile(path, key))),
            ],
            env={**os.environ, "PYTHONPATH": _SRC},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.stdout.strip() == "refused", proc.stderr[-2000:]


def _keyfile(path: Path, key: MasterKey) -> Path:
    kfile = path.with_suffix(".key")
    key.save(kfile)
    return kfile


_TRY_OPEN = """
from plinius.crypto import MasterKey
from plinius.errors import ConfigError, StorageError
from plinius.mirror import Mirror
try:
    Mirror({path!r}, MasterKey.load({kfile!r})).close()
    print("opened")
except StorageError as exc:
    print("refused" if "in use" in str(exc) else exc)
"""
