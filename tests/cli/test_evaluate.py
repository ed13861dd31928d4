"""`plinius evaluate`: the job's model from the mirror, and which data it scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from plinius.cli._jobinfo import model_for_evaluation
from plinius.crypto import MasterKey
from plinius.data import seal_dataset
from plinius.errors import ConfigError, StateMismatchError
from plinius.mirror import Mirror
from tests.conftest import assert_one_line_error, run_cli


def _seal(path: Path, key: MasterKey, seed: int, n: int, classes: int) -> str:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 255, size=(n, 4, 4), dtype=np.uint8)
    y = (x[:, 0, 0].astype(np.int64) * classes // 256).astype(np.int64)
    return seal_dataset(path, key, {"x": x, "y": y})


@pytest.fixture
def job(shm_dir: Path) -> dict[str, Path]:
    """A 3-class training set, a separately sealed test set, and a mirror trained on the first."""
    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    _seal(shm_dir / "train.pld", key, 0, 96, 3)
    _seal(shm_dir / "test.pld", key, 1, 40, 3)
    res = run_cli("train", "--key", shm_dir / "k.key", "--data", shm_dir / "train.pld",
                  "--mirror", shm_dir / "m.plm", "--model", "mlp", "--steps", "4",
                  "--batch-size", "16", "--threads", "1")  # fmt: skip
    assert res.exit_code == 0, res.output
    return {"dir": shm_dir, "key": shm_dir / "k.key", "train": shm_dir / "train.pld",
            "test": shm_dir / "test.pld", "mirror": shm_dir / "m.plm"}  # fmt: skip


def _evaluate(job: dict[str, Path], data: str, *extra: str) -> list[str]:
    return ["evaluate", "--key", str(job["key"]), "--mirror", str(job["mirror"]),
            "--data", str(job[data]), *extra]  # fmt: skip


def test_evaluate_takes_the_model_from_the_mirror_and_names_the_training_data(
    job: dict[str, Path],
) -> None:
    res = run_cli(*_evaluate(job, "train"))  # no --model: the job recorded "mlp"
    assert res.exit_code == 0, res.output
    first, second = res.stdout.splitlines()
    assert first.startswith("step 4: accuracy ") and "(96 records), loss " in first
    assert second == "scored on the training data (96 records): this is not a held-out estimate"


def test_evaluate_on_a_separately_sealed_test_set_says_so(job: dict[str, Path]) -> None:
    test_id = json.loads(run_cli("inspect", job["test"], "--json").stdout)["dataset_id"]
    train_id = json.loads(run_cli("inspect", job["train"], "--json").stdout)["dataset_id"]
    res = run_cli(*_evaluate(job, "test"))
    assert res.exit_code == 0, res.output
    first, second = res.stdout.splitlines()
    assert first.startswith("step 4: accuracy ") and "(40 records)" in first
    assert second == (
        f"scored on {job['test']} (40 records, dataset {test_id}), not the job's training set "
        f"({train_id}); held out only if no record of it was in the training set"
    )
    assert "training data" not in res.stdout


def test_evaluate_json(job: dict[str, Path]) -> None:
    for data, on_training in (("train", True), ("test", False)):
        res = run_cli(*_evaluate(job, data, "--json"))
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout)  # the freshness note goes to stderr
        assert set(doc) == {
            "mirror", "step", "model", "classes", "accuracy", "loss", "records", "data",
            "dataset_id", "training_dataset_id", "on_training_data", "freshness_checked",
        }  # fmt: skip
        assert doc["on_training_data"] is on_training
        assert (doc["step"], doc["model"], doc["classes"]) == (4, "mlp", 3)
        assert 0.0 <= doc["accuracy"] <= 1.0 and doc["data"] == str(job[data])
        assert doc["freshness_checked"] is False


def test_evaluate_uses_the_jobs_class_count_on_data_lacking_a_class(
    job: dict[str, Path],
) -> None:
    # Only classes 0 and 1: counting them here would build a 2-class model the
    # 3-class mirror does not fit; the job's recorded count is used instead.
    _seal(job["dir"] / "two.pld", MasterKey.load(job["key"]), 2, 30, 2)
    job["two"] = job["dir"] / "two.pld"
    res = run_cli(*_evaluate(job, "two"))
    assert res.exit_code == 0, res.output
    assert "(30 records)" in res.stdout


def test_evaluate_refuses_another_builtin_model(job: dict[str, Path]) -> None:
    res = run_cli(*_evaluate(job, "train", "--model", "cnn-tiny"))
    assert_one_line_error(res, "trained model 'mlp', not 'cnn-tiny'", "omit --model")
    assert run_cli(*_evaluate(job, "train", "--model", "mlp")).exit_code == 0


def test_evaluate_of_a_mirror_with_no_job_needs_model(shm_dir: Path) -> None:
    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    _seal(shm_dir / "d.pld", key, 0, 20, 2)
    with Mirror(shm_dir / "empty.plm", key):
        pass
    with Mirror(shm_dir / "bare.plm", key) as m:  # a state saved by hand, not by plinius train
        m.save({"model": torch.nn.Linear(16, 2)}, step=1)
    base = ["evaluate", "--key", shm_dir / "k.key", "--data", shm_dir / "d.pld", "--mirror"]
    assert_one_line_error(run_cli(*base, shm_dir / "empty.plm"), "holds no saved state yet")
    assert_one_line_error(run_cli(*base, shm_dir / "bare.plm"), "records no model", "--model")


def test_model_for_evaluation_needs_the_cfg_again() -> None:
    job = {"model": "nets/tiny.cfg", "total_steps": 3, "dataset_id": None, "settings": {}}
    with pytest.raises(ConfigError, match=r"trained the Darknet cfg nets/tiny.cfg.*pass --model"):
        model_for_evaluation(None, job, Path("m.plm"))
    # The same cfg may sit at another path now: any --model is taken.
    assert model_for_evaluation("elsewhere/tiny.cfg", job, Path("m.plm")) == "elsewhere/tiny.cfg"
    assert model_for_evaluation(None, {**job, "model": "mlp"}, Path("m.plm")) == "mlp"


def test_committed_value_reads_plain_entries_only(shm_dir: Path) -> None:
    key = MasterKey.generate()
    with Mirror(shm_dir / "m.plm", key) as m:
        assert m.committed_value("job", "none yet") == "none yet"
        m.save({"model": torch.nn.Linear(2, 2), "job": {"model": "mlp", "lr": 0.5}}, step=7)
        assert m.committed_value("job") == {"model": "mlp", "lr": 0.5}
        assert m.committed_value("absent") is None
        with pytest.raises(StateMismatchError, match="holds tensors"):
            m.committed_value("model")
