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
