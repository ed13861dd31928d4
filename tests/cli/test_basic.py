"""The CLI's contract: help for every command, the version, keygen, one-line errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import click

from plinius.cli import main
from plinius.crypto import MasterKey
from tests.conftest import assert_one_line_error, run_cli


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
        res = run_cli(flag)
        assert res.exit_code == 0, res.output
        assert "Usage: plinius" in res.output and "keygen" in res.output


def test_no_arguments_shows_usage_and_is_a_usage_error() -> None:
    res = run_cli()
    assert res.exit_code == 2
    assert "Usage: plinius" in res.output and "keygen" in res.output


# The command list is the CLI's contract: a command added, renamed or lost fails here
# (and the README's command table must follow).
COMMANDS = [
    ("bench",),
    ("crash-test",),
    ("demo",),
    ("evaluate",),
    ("export",),
    ("inspect",),
    ("keygen",),
    ("keyserver",),
    ("ls",),
    ("models",),
    ("rm",),
    ("seal",),
    ("tee",),
    ("tee", "status"),
    ("train",),
]


def test_the_command_list_is_pinned() -> None:
    assert sorted(_all_commands(main)) == COMMANDS


def test_every_command_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    leaves = [c for c in COMMANDS if not any(o[: len(c)] == c and o != c for o in COMMANDS)]
    missing = [" ".join(c) for c in leaves if f"`plinius {' '.join(c)}" not in readme]
    assert missing == [], f"commands missing from README.md's command table: {missing}"


def test_version() -> None:
    res = run_cli("--version")
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
        res = run_cli(*path, "--help")
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
    res = run_cli("keygen", str(out))
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = MasterKey.load(out)
    assert key.fingerprint.hex() in res.stdout
    assert out.read_bytes().hex() not in res.output  # the key itself is never printed
    assert res.stderr == ""


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "owner.key"
    assert run_cli("keygen", str(out)).exit_code == 0
    first = out.read_bytes()
    res = run_cli("keygen", str(out))
    assert_one_line_error(res, "already exists", str(out))
    assert out.read_bytes() == first


def test_keygen_missing_directory(tmp_path: Path) -> None:
    res = run_cli("keygen", str(tmp_path / "nope" / "owner.key"))
    assert_one_line_error(res, "directory exist")
    assert not (tmp_path / "nope").exists()


def test_keygen_to_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    res = run_cli("keygen", str(tmp_path))
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_keygen_needs_an_argument() -> None:
    res = run_cli("keygen")
    assert res.exit_code == 2 and "Missing argument" in res.output


def test_unknown_command_is_a_usage_error() -> None:
    res = run_cli("no-such-command")
    assert res.exit_code == 2 and "No such command" in res.output


def test_debug_variable_shows_the_real_exception(tmp_path: Path) -> None:
    out = tmp_path / "owner.key"
    out.write_bytes(b"x")
    res = run_cli("keygen", str(out), env={"PLINIUS_DEBUG": "1"})
    assert res.exit_code == 1 and res.exception is not None
    assert type(res.exception).__name__ == "KeyFileError"
    assert os.environ.get("PLINIUS_DEBUG") is None
