"""The CLI's contract: help for every command, the version, keygen, one-line errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from plinius.cli import main
from plinius.crypto import MasterKey


def _run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(main, list(args), prog_name="plinius")


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _all_commands(cmd, (*prefix, name))
    return out


def test_help_lists_keygen() -> None:
    for flag in ("--help", "-h"):
        res = _run(flag)
        assert res.exit_code == 0, res.output
        assert "Usage: plinius" in res.output and "keygen" in res.output


def test_no_arguments_shows_usage() -> None:
    res = _run()
    assert res.exit_code in (0, 2) and "Usage: plinius" in res.output


def test_version() -> None:
    res = _run("--version")
    assert res.exit_code == 0
    assert res.output.strip() == f"plinius, version {version('plinius')}"


def test_console_script_help_runs_in_a_fresh_process() -> None:
    # The real entry point, not the in-process runner: imports must all work.
    proc = subprocess.run(
        [sys.executable, "-c", "from plinius.cli import main; main()", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "keygen" in proc.stdout


def _command(path: tuple[str, ...]) -> click.Command:
    group: click.Group = main
    for name in path[:-1]:
        sub = group.get_command(click.Context(group), name)
        assert isinstance(sub, click.Group)
        group = sub
    cmd = group.get_command(click.Context(group), path[-1])
    assert cmd is not None
    return cmd


# Generic on purpose: other modules register commands over time; each is checked.
def test_every_command_has_help_text() -> None:
    commands = _all_commands(main)
    assert ("keygen",) in commands
    for path in commands:
        cmd = _command(path)
        assert (cmd.help or "").strip(), f"'plinius {' '.join(path)}' has no help text"
        assert cmd.get_short_help_str().strip()
        res = _run(*path, "--help")
        assert res.exit_code == 0, f"plinius {' '.join(path)} --help: {res.output}"
        assert f"Usage: plinius {' '.join(path)}" in res.output


def test_every_option_has_help_text() -> None:
    missing = [
        f"plinius {' '.join(path)} {'/'.join(param.opts)}"
        for path in _all_commands(main)
        for param in _command(path).params
        if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()
    ]
    assert missing == [], f"options without help text: {missing}"


def test_keygen_writes_a_0600_key(tmp_path: Path) -> None:
    out = tmp_path / "owner.key"
    res = _run("keygen", str(out))
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = MasterKey.load(out)
    assert key.fingerprint.hex() in res.stdout
    assert out.read_bytes().hex() not in res.output  # the key itself is never printed
    assert res.stderr == ""


def _assert_one_line_error(res: click.testing.Result, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0]


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "owner.key"
    assert _run("keygen", str(out)).exit_code == 0
    first = out.read_bytes()
    res = _run("keygen", str(out))
    _assert_one_line_error(res, "already exists", str(out))
    assert out.read_bytes() == first


def test_keygen_missing_directory(tmp_path: Path) -> None:
    res = _run("keygen", str(tmp_path / "nope" / "owner.key"))
    _assert_one_line_error(res, "directory exist")
    assert not (tmp_path / "nope").exists()


def test_keygen_to_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    res = _run("keygen", str(tmp_path))
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_keygen_needs_an_argument() -> None:
    res = _run("keygen")
    assert res.exit_code == 2 and "Missing argument" in res.output


def test_unknown_command_is_a_usage_error() -> None:
    res = _run("no-such-command")
    assert res.exit_code == 2 and "No such command" in res.output


def test_debug_variable_shows_the_real_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "owner.key"
    out.write_bytes(b"x")
    monkeypatch.setenv("PLINIUS_DEBUG", "1")
    res = _run("keygen", str(out))
    assert res.exit_code == 1 and res.exception is not None
    assert type(res.exception).__name__ == "KeyFileError"
    monkeypatch.delenv("PLINIUS_DEBUG")
    assert os.environ.get("PLINIUS_DEBUG") is None
