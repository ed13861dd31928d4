"""Freshness through the command line: every command that reads a mirror takes --counter.

The attacker keeps an old copy of the mirror (authentic: every tag verifies) and
puts it back after the job moved on. Only the counter the job ran with tells
them apart, so `export`, `evaluate` and `inspect --key` must check it when given
one, and say plainly when they did not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import Result

from tests.cli.conftest import sealed_job
from tests.conftest import assert_one_line_error, run_cli

NOTE_COUNTER_USED = (
    "note: freshness not checked: this mirror's job used a freshness counter; pass --counter "
    "(file:PATH, tpm[:TCTI] or keyserver, as given to 'plinius train') to check it; without "
    "it a rolled-back copy of the mirror is not detected"
)
NOTE_NO_COUNTER = (
    "note: freshness not checked: this mirror was written without a freshness counter, so a "
    "rolled-back copy of it cannot be detected"
)
TRAIN_NOTE = (
    "note: no --counter: freshness is unprotected (a rolled-back copy of the mirror is not "
    "detected); pass --counter (file:PATH, tpm[:TCTI] or keyserver) to enable it"
)


@pytest.fixture
def job(shm_dir: Path) -> dict[str, Path]:
    return {**sealed_job(shm_dir, records=200), "counter": shm_dir / "ctr"}


def _train(job: dict[str, Path], steps: int, *extra: str) -> Result:
    res = run_cli(
        "train", "--key", job["key"], "--data", job["data"], "--mirror", job["mirror"],
        "--model", "cnn-tiny", "--batch-size", "32", "--threads", "1", "--steps", str(steps),
        *extra,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return res


def _export(job: dict[str, Path], out: str, *extra: str) -> Result:
    return run_cli("export", job["mirror"], "--key", job["key"], "--out", job["dir"] / out, *extra)


def _evaluate(job: dict[str, Path], *extra: str) -> Result:
    return run_cli(
        "evaluate", "--key", job["key"], "--data", job["data"], "--mirror", job["mirror"],
        "--model", "cnn-tiny", *extra,
    )  # fmt: skip


def _inspect(job: dict[str, Path], *extra: str) -> Result:
    return run_cli("inspect", job["mirror"], "--key", job["key"], *extra)


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the next `plinius train` stop (as on Ctrl-C) once ``step`` is reported."""
    from plinius.job import EventLog

    real = EventLog.write

    def write(self: EventLog, event: str, **fields: object) -> None:
        real(self, event, **fields)
        if event == "step" and fields["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(EventLog, "write", write)


@pytest.fixture
def rolled_back(job: dict[str, Path]) -> dict[str, Path]:
    """A job of 6 steps with --counter file:C whose step-3 copy was put back after step 6."""
    counter = ("--counter", f"file:{job['counter']}", "--sync-save")
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_at(mp, 3)
        res = run_cli(
            "train", "--key", job["key"], "--data", job["data"], "--mirror", job["mirror"],
            "--model", "cnn-tiny", "--batch-size", "32", "--threads", "1", "--steps", "6",
            *counter,
        )  # fmt: skip
        assert res.exit_code == 130, res.output
    old = job["dir"] / "m.old"
    shutil.copy2(job["mirror"], old)  # the host keeps a copy at step 3
    assert "resumed after step 3 of 6" in _train(job, 6, *counter).stdout
    assert int(job["counter"].read_text()) > 3
    shutil.copy2(old, job["mirror"])  # ... and puts it back
    return job


def test_a_rolled_back_mirror_is_refused_by_export_evaluate_and_inspect_with_counter(
    rolled_back: dict[str, Path],
) -> None:
    job = rolled_back
    counter = ("--counter", f"file:{job['counter']}")
    before = job["counter"].read_bytes()
    for res in (_export(job, "m.safetensors", *counter), _evaluate(job, *counter),
                _inspect(job, *counter)):  # fmt: skip
        err = assert_one_line_error(res, "older copy of the mirror (a rollback)")
        assert "step 3" in err
    assert not (job["dir"] / "m.safetensors").exists()  # nothing exported
    assert job["counter"].read_bytes() == before  # a reader never advances the counter


def test_without_counter_the_readers_work_and_say_freshness_was_not_checked(
    rolled_back: dict[str, Path],
) -> None:
    job = rolled_back
    res = _export(job, "m.safetensors")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == [NOTE_COUNTER_USED]
    assert "of step 3 to" in res.stdout
    res = _evaluate(job)
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == [NOTE_COUNTER_USED]
    assert res.stdout.startswith("step 3: accuracy")
    res = _inspect(job)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    fresh = [line for line in lines if line.startswith("  freshness ")]
    assert fresh == [
        "  freshness        NOT checked: this mirror's job used a freshness counter; pass "
        "--counter (file:PATH, tpm[:TCTI] or keyserver) to check it; until then a rolled-back "
        "copy would pass every check above"
    ]
    # The old wording claimed a detection that had not happened.
    assert "any rolled-back copy is detected (expects counter" not in res.stdout


def test_the_newest_copy_passes_the_counter_check(job: dict[str, Path]) -> None:
    counter = ("--counter", f"file:{job['counter']}")
    _train(job, 3, *counter)
    res = _export(job, "m.safetensors", *counter)
    assert res.exit_code == 0, res.output
    assert res.stderr == ""  # checked: no note
    res = _evaluate(job, *counter)
    assert res.exit_code == 0 and res.stderr == "", res.output
    res = _inspect(job, *counter)
    assert res.exit_code == 0, res.output
    value = int(job["counter"].read_text())
    assert (
        f"  freshness        checked against --counter file:{job['counter']}: this generation "
        f"expects counter value {value} and the counter agrees; not a rolled-back copy"
    ) in res.stdout.splitlines()
    assert "the job's policy: counter advanced on every commit" in res.stdout


def test_a_mirror_written_without_a_counter(job: dict[str, Path]) -> None:
    _train(job, 2)
    res = _export(job, "m.safetensors")
    assert res.exit_code == 0 and res.stderr.splitlines() == [NOTE_NO_COUNTER], res.output
    res = _evaluate(job)
    assert res.exit_code == 0 and res.stderr.splitlines() == [NOTE_NO_COUNTER], res.output
    res = _inspect(job)
    assert "  freshness        NOT checkable: written without a freshness counter" in res.stdout
    # Given a counter, the readers refuse: nothing in the mirror can be checked against it.
    for res in (_export(job, "m2.safetensors", "--counter", f"file:{job['counter']}"),
                _evaluate(job, "--counter", f"file:{job['counter']}"),
                _inspect(job, "--counter", f"file:{job['counter']}")):  # fmt: skip
        assert_one_line_error(res, "was last written without a freshness counter")


def test_a_job_resumed_without_its_counter_is_refused_when_checked(
    rolled_back: dict[str, Path],
) -> None:
    # The host puts the step-3 copy back and drops --counter from the command line.
    job = rolled_back
    res = _train(job, 6)
    assert res.stderr.splitlines() == [
        "note: no --counter: freshness is unprotected, although this mirror's job used a "
        "freshness counter (a rolled-back copy of the mirror is not detected); pass --counter "
        "(file:PATH, tpm[:TCTI] or keyserver, as before) to check it"
    ]
    counter = ("--counter", f"file:{job['counter']}")
    for res in (_export(job, "m.safetensors", *counter), _evaluate(job, *counter),
                _inspect(job, *counter)):  # fmt: skip
        assert_one_line_error(res, "error: ")


def test_train_without_counter_says_once_that_freshness_is_unprotected(
    job: dict[str, Path],
) -> None:
    res = _train(job, 4)
    assert res.stderr.splitlines() == [TRAIN_NOTE]  # one line, not one per step
    res = _train(job, 4, "--counter", f"file:{job['counter']}", "--mirror", job["dir"] / "n.plm")
    assert res.stderr == ""


def test_inspect_without_key_says_freshness_was_not_checked(job: dict[str, Path]) -> None:
    _train(job, 1, "--counter", f"file:{job['counter']}")
    res = run_cli("inspect", job["mirror"])
    assert res.exit_code == 0, res.output
    assert (
        "  freshness        NOT checked (needs --key, and --counter if the job used one)"
        in res.stdout.splitlines()
    )


def test_counter_option_misuse_is_a_usage_error(job: dict[str, Path]) -> None:
    _train(job, 1)
    res = run_cli("inspect", job["mirror"], "--counter", f"file:{job['counter']}")
    assert_one_line_error(res, "--counter needs --key", code=2)
    res = run_cli("inspect", job["data"], "--key", job["key"], "--counter", "file:x")
    assert_one_line_error(res, "--counter applies to mirrors only", code=2)
    res = _inspect(job, "--key-server", "http://127.0.0.1:1")
    assert_one_line_error(res, "--key-server only applies to --counter keyserver", code=2)
    res = _export(job, "m.safetensors", "--counter", "sometimes")
    assert_one_line_error(res, "file:PATH")
    res = _export(job, "m.safetensors", "--counter", "keyserver")
    assert_one_line_error(res, "--counter keyserver needs --key-server")
    assert not (job["dir"] / "m.safetensors").exists()
