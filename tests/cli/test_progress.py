"""`plinius train` progress outside a terminal: a plain line every few seconds, not silence."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from plinius.cli import train as train_cli
from tests.cli.conftest import sealed_job
from tests.conftest import run_cli


def test_plain_lines_every_interval_with_rate(capsys: pytest.CaptureFixture[str]) -> None:
    now = [100.0]
    update, stop = train_cli.make_progress(
        False, 500, plain=True, interval_s=5.0, clock=lambda: now[0]
    )
    for step in range(1, 31):  # 2 steps per second, 15 s in all
        now[0] += 0.5
        update(SimpleNamespace(step=step, loss=1.0 / step))
    stop()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "step 10/500  loss 0.1000  2.0 steps/s",
        "step 20/500  loss 0.0500  2.0 steps/s",
        "step 30/500  loss 0.0333  2.0 steps/s",
    ]


def test_nothing_when_disabled_and_not_plain(capsys: pytest.CaptureFixture[str]) -> None:
    now = [0.0]
    update, stop = train_cli.make_progress(False, 10, interval_s=0.0, clock=lambda: now[0])
    for step in range(1, 4):
        now[0] += 10
        update(SimpleNamespace(step=step, loss=0.5))
    stop()
    assert capsys.readouterr().out == ""


@pytest.fixture
def job(shm_dir: Path) -> list[str]:
    files = sealed_job(shm_dir, records=128)
    return [
        "train", "--key", str(files["key"]), "--data", str(files["data"]),
        "--mirror", str(files["mirror"]), "--model", "cnn-tiny", "--batch-size", "16",
        "--threads", "1", "--steps", "4",
    ]  # fmt: skip


def test_train_outside_a_terminal_prints_step_lines(
    job: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_cli, "PROGRESS_INTERVAL_S", 0.0)  # a line every step
    r = run_cli(*job)
    assert r.exit_code == 0, r.output
    steps = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in steps] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("  loss " in ln and ln.endswith(" steps/s") for ln in steps)


def test_train_no_progress_prints_no_step_lines(
    job: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_cli, "PROGRESS_INTERVAL_S", 0.0)
    r = run_cli(*job, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "done: 4 steps" in r.stdout
    assert not [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
