"""The wording of the CLI's messages (issue 18, item 11): a closed pipe, resume
reports, settings mismatches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


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
