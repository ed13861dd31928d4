"""plinius.dcp under real torchrun (gloo, CPU): FSDP2 + DTensor state saved by 2 processes,
loaded by 1 and by 3 (DCP reshards; plinius authenticates every piece)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from plinius.crypto import MasterKey

WORKER = Path(__file__).with_name("dcp_worker.py")


def _torchrun(nproc: int, *args: str | Path, script: Path = WORKER, timeout: float = 240) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # A session of its own: the whole group (torchrun and its workers) is killed on failure.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_saved_by_two_processes_loads_in_one_and_in_three(tmp_path: Path, key: MasterKey) -> None:
    key.save(tmp_path / "key")
    _torchrun(2, "save", tmp_path, tmp_path / "key")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert len([f for f in files if f.endswith(".pdcp")]) == 2  # one per saving rank
    out = _torchrun(1, "load", tmp_path, tmp_path / "key")
    assert "LOADED-OK world=1 rank=0" in out
    out = _torchrun(3, "load", tmp_path, tmp_path / "key")
    assert all(f"LOADED-OK world=3 rank={r}" in out for r in range(3)), out[-2000:]


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dcp_torchrun.py"


@pytest.mark.slow
def test_the_dcp_example_saves_with_two_and_loads_with_one(tmp_path: Path, key: MasterKey) -> None:
    key.save(tmp_path / "key")
    common = ("--key", tmp_path / "key", "--dir", tmp_path / "c")
    assert "saved" in _torchrun(2, *common, "save", script=EXAMPLE)
    assert "loaded" in _torchrun(1, *common, "load", script=EXAMPLE)
    other = tmp_path / "other.key"
    MasterKey.generate().save(other)
    with pytest.raises(AssertionError, match=r"error: .*another master key"):
        _torchrun(1, "--key", other, "--dir", tmp_path / "c", "load", script=EXAMPLE)
