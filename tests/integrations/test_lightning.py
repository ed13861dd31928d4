"""PyTorch Lightning: SIGKILLed runs resume bit for bit; bad input stops fit with the plinius error.

The runs are ``examples/lightning_mirror.py`` (so the example is tested too):
in child processes for the crash test, in this process for the bad-input cases.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("lightning", reason="the 'lightning' extra is not installed")

from plinius.crypto import MasterKey
from plinius.errors import IntegrityError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_mirror.py"
STEPS = 96  # 3 epochs of 32 batches


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lightning_mirror", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cmd(key: Path, mirror: Path, *extra: str) -> list[str]:
    return [sys.executable, "-W", "ignore", str(EXAMPLE), "--key", str(key),
            "--mirror", str(mirror), *extra]  # fmt: skip


def _run_until(cmd: list[str], kill_at: int | None) -> tuple[int, str]:
    """Run the example; SIGKILL it once it printed step ``kill_at``. Returns (rc, stdout)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            m = re.match(r"step (\d+) ", line)
            if kill_at is not None and m and int(m.group(1)) >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(out)


def _final(out: str) -> tuple[str, str]:
    m = re.search(r"resumed-from (\S+) final-step \d+ weights ([0-9a-f]+)", out)
    assert m, out[-2000:]
    return m.group(1), m.group(2)


@pytest.fixture
def key_file(tmp_path: Path, key: MasterKey) -> Path:
    key.save(tmp_path / "owner.key")
    return tmp_path / "owner.key"


@pytest.mark.slow
def test_sigkilled_fit_resumes_and_ends_bit_for_bit_equal(
    tmp_path: Path, shm_dir: Path, key_file: Path
) -> None:
    rc, out = _run_until(_cmd(key_file, shm_dir / "straight.plm"), None)
    assert rc == 0, out[-2000:]
    _, want = _final(out)
    seed = int.from_bytes(os.urandom(4), "big")
    kills = sorted(random.Random(seed).sample(range(3, STEPS - 3), 2))
    mirror = shm_dir / "killed.plm"
    for at in kills:
        rc, out = _run_until(_cmd(key_file, mirror), at)
        assert rc == -signal.SIGKILL, f"seed {seed}: {out[-2000:]}"
    rc, out = _run_until(_cmd(key_file, mirror), None)
    assert rc == 0, out[-2000:]
    resumed, got = _final(out)
    assert resumed != "None" and int(resumed) >= kills[-1], f"seed {seed}"
    assert got == want, f"seed {seed}, kills {kills}: weights differ after resume"


def test_bad_input_stops_fit_with_the_plinius_error_and_overwrites_nothing(
    tmp_path: Path, shm_dir: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ex = _example()
    mirror = shm_dir / "job.plm"
    ckpts = tmp_path / "ckpts"
    assert ex.main(["--key", str(key_file), "--mirror", str(mirror), "--epochs", "1",
                    "--checkpoints", str(ckpts)]) == 0  # fmt: skip
    before = mirror.read_bytes()
    other = tmp_path / "other.key"
    MasterKey.generate().save(other)
    cases = [
        (["--key", str(other)], "another master key"),  # wrong key
        (["--job", "someone-else"], "another job"),  # a mirror of another job
        (["--hidden", "16"], "model.net.0.weight"),  # the parameters changed
    ]
    for args, needle in cases:
        capsys.readouterr()
        argv = ["--key", str(key_file), "--mirror", str(mirror), "--epochs", "2", *args]
        assert ex.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert mirror.read_bytes() == before

    # ModelCheckpoint's file is a plinius mirror: encrypted, authenticated, loadable.
    from plinius.integrations.lightning import PliniusCheckpointIO

    (ck,) = (ckpts / "checkpoints").glob("*.ckpt")
    io = PliniusCheckpointIO(MasterKey.load(key_file))
    ckpt = io.load_checkpoint(ck)
    assert ckpt["global_step"] == 32 and set(ckpt["state_dict"]) == {
        "net.0.weight",
        "net.0.bias",
        "net.3.weight",
        "net.3.bias",
    }
    assert ckpt["optimizer_states"][0]["state"][0]["exp_avg"].shape == (32, 8)
    assert ck.read_bytes()[:8] == b"PLINIUSM"
    raw = bytearray(ck.read_bytes())
    raw[len(raw) // 2] ^= 1
    ck.write_bytes(raw)
    with pytest.raises(IntegrityError):
        io.load_checkpoint(ck)
