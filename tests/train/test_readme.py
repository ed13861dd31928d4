"""The README's quick start, run as written: killed with SIGKILL mid-run, resumed, exact.

The two python blocks of the README's "Quick start (library)" section are taken
literally; only ``/dev/shm/`` is pointed at the test's own directory, and a few
lines appended after the training block write the final state to a file. The
training script runs in a child process (its own process group, so its
DataLoader workers die with it), is killed with ``kill -9`` three times at
random points (after a random committed step, plus a random delay inside the
next one), is started again each time, and its final state is compared bit for
bit with an uninterrupted run's.
"""

from __future__ import annotations

import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from plinius.errors import IntegrityError
from plinius.mirror import describe_file

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"

# Appended to the training block: the live final state, for the comparison.
EPILOGUE = """
torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(),
            "sched": scheduler.state_dict(), "rng": RNGState().state_dict(),
            "data": loader.state_dict(), "step": step}, "final.pt")
"""


def quick_start_blocks() -> list[str]:
    """The python code blocks of the README's quick start, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start (library)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # one thread count for every run: float sums depend on it
    env["TMPDIR"] = str(tmp)  # the workers' multiprocessing directories
    return env


def _prepare(run_dir: Path) -> tuple[Path, dict[str, str]]:
    """Seal the data with the owner block; return the training script and its env."""
    owner, train = quick_start_blocks()[:2]
    here = f"{run_dir}/"
    (run_dir / "owner.py").write_text(owner.replace("/dev/shm/", here), encoding="utf-8")
    script = run_dir / "train.py"
    script.write_text(train.replace("/dev/shm/", here) + EPILOGUE, encoding="utf-8")
    (run_dir / "tmp").mkdir()
    env = _env(run_dir / "tmp")
    subprocess.run([sys.executable, "owner.py"], cwd=run_dir, env=env, check=True, timeout=120)
    return script, env


def _start(script: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, script.name],
        cwd=script.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a process group: the workers are killed with it
    )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the whole process group (the script and its workers) and reap the script."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # pragma: no cover - already gone
        pass
    proc.wait(timeout=30)
    _remove_orphaned_torch_shm()


def _remove_orphaned_torch_shm() -> None:
    """Remove the shared-memory files of killed DataLoader workers from /dev/shm.

    A worker hands each batch over in a ``/dev/shm/torch_<pid>_...`` file that the
    receiver unlinks; a SIGKILL between the two leaves it behind. Only files of
    processes that no longer exist are removed.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir():  # pragma: no cover - not Linux
        return
    for f in shm.glob("torch_*_*"):
        pid = f.name.split("_")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            f.unlink(missing_ok=True)


def _generation(mirror: Path) -> int:
    """The committed step (one save per step), read without the key or the lock."""
    try:
        return describe_file(mirror).generation
    except FileNotFoundError:
        return 0  # not created yet
    except IntegrityError:
        return 0  # the commit word read while being written: ask again


def _finish(proc: subprocess.Popen[bytes]) -> None:
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # pragma: no cover - a hung run
            _kill(proc)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]


def _same(a: Any, b: Any, path: str = "state") -> None:
    """``a`` and ``b`` equal bit for bit (tensors by their bytes, floats by their bits)."""
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        bits = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
        assert torch.equal(*bits), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), path
    else:
        assert a == b, path


def test_the_readme_blocks_are_the_ones_tested() -> None:
    blocks = quick_start_blocks()
    for i, block in enumerate(blocks):
        compile(block, f"README quick start block {i}", "exec")  # each one is valid Python
    owner, train = blocks[:2]
    assert "seal_dataset(" in owner
    assert "ResumableLoader(" in train and '"data": loader' in train
    assert "mirror.restore(state)" in train and "mirror.save(state" in train


@pytest.mark.slow  # five starts of a torch process with DataLoader workers
def test_the_readme_quick_start_resumes_bit_for_bit_after_kill_9(shm_dir: Path) -> None:
    straight_dir, crashed_dir = shm_dir / "straight", shm_dir / "crashed"
    straight_dir.mkdir()
    crashed_dir.mkdir()
    straight_script, straight_env = _prepare(straight_dir)
    script, env = _prepare(crashed_dir)
    mirror = crashed_dir / "job.plm"
    # 3 epochs of ceil(1797 / 64) = 29 batches; the kills land well before the end.
    total = 3 * 29
    rng = random.Random(18)
    targets = sorted(rng.sample(range(3, total - 15), 3))

    straight = _start(straight_script, straight_env)  # alongside the crashed job
    killed_at: list[int] = []
    try:
        for target in targets:
            proc = _start(script, env)
            try:
                deadline = time.monotonic() + 120
                while _generation(mirror) < target:
                    assert proc.poll() is None, "the job ended before it was killed"
                    assert time.monotonic() < deadline, f"step {target} never came"
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, 0.03))  # somewhere inside a later step
                assert proc.poll() is None, "the job ended before it was killed"
            finally:
                _kill(proc)
            killed_at.append(_generation(mirror))
        resumed = _start(script, env)
        _finish(resumed)
        _finish(straight)
    finally:
        if straight.poll() is None:  # pragma: no cover - a failure above
            _kill(straight)
        _remove_orphaned_torch_shm()

    assert killed_at == sorted(killed_at) and killed_at[0] >= targets[0], killed_at
    final = torch.load(crashed_dir / "final.pt", weights_only=False)
    expected = torch.load(straight_dir / "final.pt", weights_only=False)
    assert final["step"] == expected["step"] == total
    # The script seeds torch only: Python's and NumPy's generators start from
    # fresh entropy in every process, so two uninterrupted runs differ there too
    # (the job draws nothing from them). Everything else must match.
    for rng_state in (final["rng"], expected["rng"]):
        del rng_state["python"], rng_state["numpy"]
    _same(final, expected)
