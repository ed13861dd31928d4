"""Hugging Face Trainer: SIGKILLed runs resume bit for bit; bad input stops train() with an error.

The runs are ``examples/hf_mirror.py`` (so the example is tested too): in child
processes for the crash test, in this process for the other cases. A tiny GPT-2
built from a config, on data the example makes: no hub access.
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
from typing import Any

import pytest

pytest.importorskip("transformers", reason="the 'hf' extra is not installed")
os.environ["HF_HUB_OFFLINE"] = "1"

from plinius.crypto import MasterKey
from plinius.errors import ConfigError, PliniusError, StateMismatchError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_mirror.py"
STEPS = 96  # 3 epochs of 32 optimizer steps


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hf_mirror", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cmd(key: Path, mirror: Path, *extra: str) -> list[str]:
    return [sys.executable, "-W", "ignore", str(EXAMPLE), "--key", str(key),
            "--mirror", str(mirror), *extra]  # fmt: skip


def _run_until(cmd: list[str], kill_at: int | None) -> tuple[int, str]:
    """Run the example; SIGKILL it once it logged step ``kill_at``. Returns (rc, stdout)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
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


_FINAL = re.compile(
    r"resumed-from (\S+) final-step (\d+) weights ([0-9a-f]+) losses ([0-9a-f]+) "
    r"train-loss (\S+)"
)


def _final(out: str) -> tuple[str, tuple[str, ...]]:
    """The resumed step, and (final step, weights, losses, train loss) to compare."""
    m = _FINAL.search(out)
    assert m, out[-2000:]
    return m.group(1), m.groups()[1:]


@pytest.fixture
def key_file(tmp_path: Path, key: MasterKey) -> Path:
    key.save(tmp_path / "owner.key")
    return tmp_path / "owner.key"


@pytest.mark.slow
def test_sigkilled_train_resumes_and_ends_bit_for_bit_equal(
    tmp_path: Path, shm_dir: Path, key_file: Path
) -> None:
    rc, out = _run_until(_cmd(key_file, shm_dir / "straight.plm"), None)
    assert rc == 0, out[-2000:]
    resumed, want = _final(out)
    assert resumed == "None" and want[0] == str(STEPS)
    seed = int.from_bytes(os.urandom(4), "big")
    kills = sorted(random.Random(seed).sample(range(3, STEPS - 3), 2))
    mirror = shm_dir / "killed.plm"
    outdir = tmp_path / "out"
    for at in kills:
        rc, out = _run_until(_cmd(key_file, mirror, "--output-dir", str(outdir)), at)
        assert rc == -signal.SIGKILL, f"seed {seed}: {out[-2000:]}"
    rc, out = _run_until(_cmd(key_file, mirror, "--output-dir", str(outdir)), None)
    assert rc == 0, out[-2000:]
    resumed, got = _final(out)
    # Step k is committed once its logging is done: at the next step's start.
    assert resumed != "None" and int(resumed) >= kills[-1] - 1, f"seed {seed}"
    assert got == want, f"seed {seed}, kills {kills}: weights or losses differ after resume"
    # The mirror is the only checkpoint: nothing was written in the output directory.
    assert not outdir.exists() or not any(outdir.rglob("*")), sorted(outdir.rglob("*"))


class _Crash(Exception):
    pass


def _crash_at(step: int) -> Any:
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == step:
                raise _Crash

    return CrashAt()


@pytest.mark.slow
@pytest.mark.parametrize(("every", "accum", "crash"), [(3, 2, 23), (1, 1, 33)])
def test_every_k_steps_with_accumulation_resumes_equal(
    shm_dir: Path, key_file: Path, every: int, accum: int, crash: int
) -> None:
    """K > 1 with gradient accumulation, and a resume at an epoch's start (step 32)."""
    ex = _example()
    key = MasterKey.load(key_file)
    results = []
    for name, crash_at in (("straight", None), ("crashed", crash)):
        argv = ["--key", str(key_file), "--mirror", str(shm_dir / f"{name}.plm"),
                "--epochs", "2", "--every", str(every), "--grad-accum", str(accum)]  # fmt: skip
        args = ex.parse(argv)
        if crash_at is not None:
            t = ex.make_trainer(args, key, str(shm_dir / "out"))
            t.add_callback(_crash_at(crash_at))
            with pytest.raises(_Crash):
                t.train()
        t = ex.make_trainer(args, key, str(shm_dir / "out"))
        out = t.train()
        results.append(_final(ex.summary(t, out.training_loss)))
    (r0, straight), (r1, crashed) = results
    steps_total = 2 * 32 // accum
    assert r0 == "None" and straight[0] == str(steps_total)
    # The last commit before the crash: the last multiple of K the run finished.
    assert int(r1) == (crash - 1) // every * every if crash % every else crash - every
    assert crashed == straight


def test_bad_input_stops_train_with_the_plinius_error_and_overwrites_nothing(
    tmp_path: Path, shm_dir: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ex = _example()
    mirror = shm_dir / "job.plm"
    argv = ["--key", str(key_file), "--mirror", str(mirror), "--epochs", "1"]
    assert ex.main(argv) == 0
    resumed, first = _final(capsys.readouterr().out)
    assert resumed == "None"
    # A rerun of the finished job trains no further and reports the same run.
    assert ex.main(argv) == 0
    resumed, again = _final(capsys.readouterr().out)
    assert resumed == "32" and again == first
    before = mirror.read_bytes()
    other = tmp_path / "other.key"
    MasterKey.generate().save(other)
    cases = [
        (["--key", str(other)], "another master key"),  # wrong key
        (["--job", "someone-else"], "another job"),  # a mirror of another job
        (["--embd", "16"], "model.transformer.wte.weight"),  # the parameters changed
    ]
    for args, needle in cases:
        capsys.readouterr()
        argv = ["--key", str(key_file), "--mirror", str(mirror), "--epochs", "2", *args]
        assert ex.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert mirror.read_bytes() == before

    # An explicit checkpoint wins over the mirror, but another job's mirror is still refused.
    ex.transformers.logging.set_verbosity_error()
    args = ex.parse(["--key", str(key_file), "--mirror", str(mirror), "--job", "someone-else"])
    t = ex.make_trainer(args, MasterKey.load(key_file), str(tmp_path / "out"))
    with pytest.raises(StateMismatchError, match="another job"):
        t.train(resume_from_checkpoint=str(tmp_path / "no-such-checkpoint"))
    assert mirror.read_bytes() == before


def test_the_callback_without_the_resuming_trainer_is_refused(
    shm_dir: Path, key_file: Path
) -> None:
    from transformers import Trainer

    from plinius.integrations.hf import PliniusMirrorCallback

    ex = _example()
    key = MasterKey.load(key_file)
    args = ex.parse(["--key", str(key_file), "--mirror", str(shm_dir / "m.plm")])
    t = ex.make_trainer(args, key, str(shm_dir / "out"))
    (cb,) = (c for c in t.callback_handler.callbacks if isinstance(c, PliniusMirrorCallback))
    plain = Trainer(model=t.model, args=t.args, train_dataset=t.train_dataset, callbacks=[cb])
    with pytest.raises(ConfigError, match="PliniusTrainer"):
        plain.train()
    assert not (shm_dir / "m.plm").exists()
    with pytest.raises(PliniusError, match="every_n_steps"):
        PliniusMirrorCallback(shm_dir / "m.plm", key, every_n_steps=0)
