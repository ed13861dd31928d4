"""`plinius train`, `evaluate`, `crash-test` and `demo`: happy paths, bad input, real SIGKILLs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from plinius.crypto import MasterKey
from plinius.data import seal_dataset
from tests.conftest import run_cli


@pytest.fixture
def job(shm_dir: Path) -> dict[str, Path]:
    key_path = shm_dir / "k.key"
    key = MasterKey.generate()
    key.save(key_path)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(300, 8, 8), dtype=np.uint8)
    y = (x[:, :4, :].mean(axis=(1, 2)) > 127).astype(np.int64)
    data = shm_dir / "d.pld"
    seal_dataset(data, key, {"image": x, "label": y})
    return {"key": key_path, "data": data, "mirror": shm_dir / "m.plm", "dir": shm_dir}


def _train(job: dict[str, Path], *extra: str) -> list[str]:
    return [
        "train", "--key", str(job["key"]), "--data", str(job["data"]),
        "--mirror", str(job["mirror"]), "--model", "cnn-tiny", "--batch-size", "32",
        "--threads", "1", *extra,
    ]  # fmt: skip


def test_train_then_rerun_resumes_then_evaluate(job: dict[str, Path]) -> None:
    r = run_cli(*_train(job, "--steps", "6"))
    assert r.exit_code == 0, r.output
    assert "starting a new job" in r.output
    assert "done: 6 steps" in r.output
    r = run_cli(*_train(job, "--steps", "6"))
    assert r.exit_code == 0, r.output
    assert "resumed after step 6 of 6" in r.output
    r = run_cli("evaluate", "--key", str(job["key"]), "--data", str(job["data"]),
         "--mirror", str(job["mirror"]), "--model", "cnn-tiny")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "step 6: accuracy" in r.output


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--steps", "0"], 2, "--steps"),
        (["--steps", "3", "--model", "no-such-model"], 1, "error:"),
        (["--steps", "3", "--key-server", "http://127.0.0.1:9"], 1, "not both"),
    ],
)
def test_train_bad_input(job: dict[str, Path], args: list[str], code: int, needle: str) -> None:
    r = run_cli(*_train(job, *args))
    assert r.exit_code == code, r.output
    assert needle in r.output
    assert "Traceback" not in r.output


def test_train_missing_key_and_data(job: dict[str, Path]) -> None:
    args = _train(job, "--steps", "2")
    args[args.index("--key") + 1] = str(job["dir"] / "missing.key")
    r = run_cli(*args)
    assert r.exit_code == 1 and "plinius keygen" in r.output
    assert len(r.output.strip().splitlines()) == 1
    args = _train(job, "--steps", "2")
    args[args.index("--data") + 1] = str(job["dir"] / "missing.pld")
    r = run_cli(*args)
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output


def test_evaluate_without_mirror(job: dict[str, Path]) -> None:
    r = run_cli("evaluate", "--key", str(job["key"]), "--data", str(job["data"]),
         "--mirror", str(job["dir"] / "none.plm"), "--model", "cnn-tiny")  # fmt: skip
    assert r.exit_code == 1 and "train first" in r.output


@pytest.mark.slow
def test_crash_test_command_kills_and_matches(job: dict[str, Path]) -> None:
    """Real SIGKILLs: N steps straight vs the same job killed twice, compared bit for bit."""
    r = run_cli("crash-test", "--key", str(job["key"]), "--data", str(job["data"]),
         "--mirror", str(job["mirror"]), "--steps", "60", "--batch-size", "32",
         "--crashes", "2", "--workdir", str(job["dir"] / "w"))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "2 crashes, job finished: True" in r.output
    assert "bit-for-bit identical to an uninterrupted run: yes" in r.output


@pytest.mark.slow
def test_demo_core_path_small(tmp_path: Path) -> None:
    from plinius.bench.demo import DemoConfig, run_demo

    rep = run_demo(
        DemoConfig(workdir=tmp_path, steps=40, crashes=2, timing_repeats=1), log=lambda s: None
    )
    assert rep.crashes == 2
    assert rep.identical, rep.differences
    assert rep.losses_identical
    assert rep.plot is not None and Path(rep.plot).stat().st_size > 1000
    assert rep.mirror_save_ms > 0 and rep.ssd_save_ms > 0
    assert 0.0 <= rep.accuracy_clean <= 1.0
    assert (tmp_path / "report.json").exists()


def test_train_with_file_counter_refuses_a_deleted_mirror(job: dict[str, Path]) -> None:
    counter = job["dir"] / "counter"
    r = run_cli(*_train(job, "--steps", "3", "--counter", f"file:{counter}"))
    assert r.exit_code == 0, r.output
    assert int(counter.read_text()) >= 1
    job["mirror"].unlink()  # the host removes the mirror to restart training from scratch
    r = run_cli(*_train(job, "--steps", "3", "--counter", f"file:{counter}"))
    assert r.exit_code == 1, r.output
    assert "error:" in r.output and "Traceback" not in r.output


def test_train_bad_counter_spec(job: dict[str, Path]) -> None:
    r = run_cli(*_train(job, "--steps", "3", "--counter", "sometimes"))
    assert r.exit_code == 1 and "file:PATH" in r.output


@pytest.mark.slow
def test_demo_without_matplotlib_skips_only_the_png(
    tmp_path: Path, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bare `pip install plinius` has no matplotlib (the `plots` extra): the demo
    # still succeeds, says how to get the loss curve, and draws nothing.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = run_cli("demo", "--workdir", str(tmp_path), "--pm-dir", str(shm_dir), "--crashes", "1",
         "--steps", "20", "--batch-size", "32")  # fmt: skip
    assert r.exit_code == 0, r.output
    note = "loss curve skipped: matplotlib is not installed (pip install 'plinius[plots]')"
    assert note in r.output.splitlines()
    assert "final state bit-for-bit identical" in r.output
    assert not (tmp_path / "loss_curve.png").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plot"] is None and note in report["notes"]
