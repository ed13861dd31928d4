"""Shared fixtures and helpers: a master key, scratch directories that are always
removed, and the in-process CLI runner with its one-line-error check.

Helpers are plain functions, imported where needed::

    from tests.conftest import assert_one_line_error, run_cli
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from plinius.crypto import MasterKey

# Variables the CLI reads; a test sets them explicitly or not at all.
_CLI_ENV: dict[str, str | None] = {
    "PLINIUS_KEY_SERVER": None,
    "PLINIUS_KEY_SERVER_PUBKEY": None,
    "PLINIUS_DEBUG": None,
}


def run_cli(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None, input: str | None = None
) -> Result:
    """Run ``plinius ARGS...`` in this process (click's runner), in a clean CLI environment.

    Args:
        args: the command line after ``plinius``; paths are turned into strings.
        env: variables to set for this run (``PLINIUS_*`` ones are unset otherwise).
        input: what the command reads from standard input.

    Returns:
        click's ``Result``: ``exit_code``, ``stdout``, ``stderr``, ``output``, ``exception``.
    """
    from plinius.cli import main

    return CliRunner().invoke(
        main,
        [os.fspath(a) for a in args],
        env={**_CLI_ENV, **(env or {})},
        input=input,
        prog_name="plinius",
    )


def assert_one_line_error(res: Result, *needles: str, code: int = 1, match: str = "") -> str:
    """Assert the CLI failed the way every plinius error must: exit ``code``, one line.

    Args:
        res: the result of :func:`run_cli`.
        needles: substrings the error line must contain.
        code: the expected exit code (1: a PliniusError; 2: a usage error, whose
            message click formats over several lines, so only exit code, needles
            and ``match`` are checked then).
        match: a regular expression the error text must match (searched).

    Returns:
        The error line (for exit 1), else stderr, stripped.
    """
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    if code == 1:
        # The error is one line, the last; only one-line notes said before it
        # (``note: freshness is unprotected``, say) may precede it.
        *notes, err = err.splitlines() or [""]
        assert err.startswith("error: "), res.stderr
        assert all(n.startswith("note: ") for n in notes), res.stderr
    for n in needles:
        assert n in err, (n, err)
    if match:
        assert re.search(match, err), (match, err)
    return err


@pytest.fixture
def key() -> MasterKey:
    """A fresh random master key."""
    return MasterKey.generate()


@pytest.fixture
def other_key() -> MasterKey:
    """A second, different master key."""
    return MasterKey.generate()


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private directory in /dev/shm (emulated PM), removed afterwards.

    Falls back to the system temp directory where /dev/shm does not exist.
    """
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="plinius-test-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
