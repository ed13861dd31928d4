"""The wording of the CLI's messages (issue 18, item 11): a closed pipe, resume
reports, settings mismatches."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plinius.crypto import MasterKey
from plinius.data import seal_dataset
from tests.conftest import assert_one_line_error, run_cli


def _run_with_closed_stdout(*args: str) -> tuple[int, bytes]:
    # The reader closes its end before plinius writes: every write gets EPIPE,
    # as when `| head -1` has exited.
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "plinius", *args],
            stdout=w,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(w)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("args", [("models",), ("--version",)])
def test_a_closed_pipe_is_not_a_failure(args: tuple[str, ...]) -> None:
    code, err = _run_with_closed_stdout(*args)
    assert (code, err) == (0, b"")


def test_models_into_head_exits_0_quietly() -> None:
    # The shell pipeline of the report: head exits after one line.
    proc = subprocess.run(
        f"'{sys.executable}' -m plinius models | head -1; echo \"rc=${{PIPESTATUS[0]}}\"",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("built-in models") and lines[-1] == "rc=0"
    assert proc.stderr == ""


# --------------------------------------------------------------------------- (d) crash-test


def test_crash_test_says_which_steps_were_not_committed() -> None:
    from plinius.bench.crashtest import RunRecord, StepLoss, describe_run

    def run(i: int, killed: bool, resumed: int | None, steps: range) -> RunRecord:
        return RunRecord(
            index=i,
            killed=killed,
            kill_after_s=None,
            wall_s=1.0,
            exit_code=None if killed else 0,
            resumed_from=resumed,
            steps=[StepLoss(s, 0.5) for s in steps],
        )

    first = run(0, True, None, range(1, 139))
    second = run(1, False, 137, range(138, 201))
    assert describe_run(first) == "run 1: new job, reached step 138, killed"
    assert describe_run(second, first) == (
        "run 2: resumed after step 137, the last committed step "
        "(step 138 was not yet committed and is redone), reached step 200, finished"
    )
    third = run(2, False, 130, range(131, 201))
    assert "(steps 131-138 were not yet committed and are redone)" in describe_run(third, first)
    caught_up = run(1, False, 138, range(139, 201))
    assert "not yet committed" not in describe_run(caught_up, first)


# --------------------------------------------------------------------------- (e) progress


def test_progress_bar_shows_no_nan_before_the_first_step() -> None:
    from plinius.cli.train import loss_text

    assert loss_text(None) == "-" and loss_text(float("nan")) == "-"
    assert loss_text(0.123456) == "0.1235"


# --------------------------------------------------------------------------- (a), (b), (c)


@pytest.fixture
def ws(shm_dir: Path) -> dict[str, Path]:
    """A key, a sealed 4x4 3-class dataset and a place for the mirror."""
    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 255, size=(60, 4, 4), dtype=np.uint8)
    seal_dataset(shm_dir / "d.pld", key, {"image": x, "label": np.arange(60) % 3})
    return {"key": shm_dir / "k.key", "data": shm_dir / "d.pld", "mirror": shm_dir / "m.plm"}


def _train(ws: dict[str, Path], *extra: str, model: str = "mlp") -> list[str | Path]:
    return [
        "train", "--key", ws["key"], "--data", ws["data"], "--mirror", ws["mirror"],
        "--model", model, "--batch-size", "20", "--threads", "1", "--no-progress",
        "--steps", "2", *extra,
    ]  # fmt: skip


def test_resume_with_another_model_names_both_models(ws: dict[str, Path]) -> None:
    assert run_cli(*_train(ws)).exit_code == 0
    res = run_cli(*_train(ws, model="cnn-tiny"))
    line = assert_one_line_error(res, "the mirror holds a job of model mlp; you asked for cnn-tiny")
    assert "saved float32" not in line  # no tensor-shape listing


def test_a_setting_left_to_its_default_is_spelled_out(ws: dict[str, Path]) -> None:
    assert run_cli(*_train(ws)).exit_code == 0
    res = run_cli(*_train(ws, "--lr", "0.01"))
    line = assert_one_line_error(res, "lr=unset (the default) (now 0.01)")
    assert "None" not in line


def test_resume_report_leads_with_the_total_and_its_parts(ws: dict[str, Path]) -> None:
    assert run_cli(*_train(ws)).exit_code == 0
    res = run_cli(*_train(ws))
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("resumed after step 2"))
    assert re.fullmatch(
        r"resumed after step 2 of 2 in [0-9.]+ (ms|s): model [0-9.]+ ms, key [0-9.]+ ms, "
        r"mirror open [0-9.]+ ms, restore [0-9.]+ ms",
        line,
    ), line


def test_resume_parts_put_the_total_first() -> None:
    from plinius.cli.train import resume_parts

    assert resume_parts(model=2.5329, key=0.0012, open=0.0003, restore=0.0055) == (
        "2.54 s: model 2533 ms, key 1.2 ms, mirror open 0.3 ms, restore 5.5 ms"
    )
    assert resume_parts(model=0.01, key=0.001, open=0.0, restore=0.002) == (
        "13.0 ms: model 10.0 ms, key 1.0 ms, mirror open 0.0 ms, restore 2.0 ms"
    )


# --------------------------------------------------------------------------- item 4 through the CLI


@pytest.mark.parametrize(
    ("shape", "model", "needles"),
    [
        ((16, 16, 3), "cnn-tiny", ("channels-last", "(3, 16, 16)")),
        ((4,), "cnn-tiny", ("1-D records", "--model mlp")),
    ],
)
def test_train_refuses_records_the_cnn_would_misread(
    shm_dir: Path, shape: tuple[int, ...], model: str, needles: tuple[str, ...]
) -> None:
    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    x = np.random.default_rng(0).integers(0, 255, size=(20, *shape), dtype=np.uint8)
    seal_dataset(shm_dir / "d.pld", key, {"x": x, "label": np.arange(20) % 2})
    ws = {"key": shm_dir / "k.key", "data": shm_dir / "d.pld", "mirror": shm_dir / "m.plm"}
    assert_one_line_error(run_cli(*_train(ws, model=model)), *needles)
    assert not ws["mirror"].exists()  # refused before anything was written


def test_a_cfg_refuses_channels_last_records_of_the_same_count(shm_dir: Path) -> None:
    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    x = np.random.default_rng(0).integers(0, 255, size=(20, 8, 8, 3), dtype=np.uint8)
    seal_dataset(shm_dir / "d.pld", key, {"x": x, "label": np.arange(20) % 2})
    cfg = shm_dir / "rgb.cfg"
    cfg.write_text("[net]\nheight=8\nwidth=8\nchannels=3\n[connected]\noutput=2\n[softmax]\n")
    ws = {"key": shm_dir / "k.key", "data": shm_dir / "d.pld", "mirror": shm_dir / "m.plm"}
    assert_one_line_error(
        run_cli(*_train(ws, model=str(cfg))), "channels=3 height=8 width=8", "channels-last"
    )
