"""One file named by two path options of a command: always refused, the file untouched.

The attack: the same file given for two options, one of which the command
writes (``--events`` appended to the counter file, ``--audit-log`` to the
master key, ``--sealed-key`` written over the mirror), directly or through a
symbolic or hard link, or before the file exists (``--events`` naming the
counter file that the first increment would create). Every command checks all
of its path options (``plinius.cli._paths``) before it opens anything.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from plinius.crypto import MasterKey
from plinius.data import seal_dataset
from tests.conftest import assert_one_line_error, run_cli

_PUBKEY = "ab" * 32

# command name -> (argv before the path options, {path option: its own file name}).
# "MIRROR" and "PATH" are positional arguments; "--counter file:" is --counter file:PATH.
COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "train": (
        ["train", "--steps", "2"],
        {"--key": "k.key", "--data": "d.pld", "--mirror": "m.plm", "--events": "e.jsonl",
         "--counter file:": "ctr", "--model": "net.cfg", "--init-from": "old.plm"},
    ),
    "train (key server)": (
        ["train", "--steps", "2", "--model", "cnn-tiny", "--key-server", "http://127.0.0.1:1",
         "--key-server-pubkey", _PUBKEY],
        {"--data": "d.pld", "--mirror": "m.plm", "--sealed-key": "job.sealed",
         "--events": "e.jsonl", "--counter file:": "ctr"},
    ),
    "evaluate": (
        ["evaluate", "--model", "cnn-tiny"],
        {"--key": "k.key", "--data": "d.pld", "--mirror": "m.plm", "--counter file:": "ctr"},
    ),
    "evaluate (key server)": (
        ["evaluate", "--model", "cnn-tiny", "--key-server", "http://127.0.0.1:1",
         "--key-server-pubkey", _PUBKEY],
        {"--data": "d.pld", "--mirror": "m.plm", "--sealed-key": "job.sealed",
         "--counter file:": "ctr"},
    ),
    "export": (
        ["export"],
        {"MIRROR": "m.plm", "--key": "k.key", "--out": "o.safetensors",
         "--counter file:": "ctr"},
    ),
    "inspect": (["inspect"], {"PATH": "m.plm", "--key": "k.key", "--counter file:": "ctr"}),
    "seal --npz": (["seal"], {"--key": "k.key", "--out": "o.pld", "--npz": "in.npz"}),
    "seal --csv": (
        ["seal", "--label-column", "y"],
        {"--key": "k.key", "--out": "o.pld", "--csv": "in.csv"},
    ),
    "seal --idx": (
        ["seal"],
        {"--key": "k.key", "--out": "o.pld", "--idx-images": "img.idx", "--idx-labels": "lab.idx"},
    ),
    "keyserver": (
        ["keyserver", "--port", "0"],
        {"--key": "k.key", "--policy": "policy.toml", "--identity": "id.pem",
         "--audit-log": "audit.jsonl", "--tls-cert": "cert.pem", "--tls-key": "tls.key"},
    ),
    "crash-test": (
        ["crash-test", "--schedule", "trace", "--no-verify"],
        {"--key": "k.key", "--data": "d.pld", "--mirror": "m.plm", "--trace": "trace.csv"},
    ),
}  # fmt: skip

# The only pair that may name one file: a PEM holding both the chain and its key.
ALLOWED = {("keyserver", frozenset({"--tls-cert", "--tls-key"}))}
POSITIONAL = {"MIRROR", "PATH"}  # click requires these to exist


def _argv(base: list[str], paths: dict[str, Path]) -> list[str]:
    args = list(base[:1])
    args += [str(p) for opt, p in paths.items() if opt in POSITIONAL]
    args += base[1:]
    for opt, p in paths.items():
        if opt in POSITIONAL:
            continue
        args += ["--counter", f"file:{p}"] if opt == "--counter file:" else [opt, str(p)]
    return args


def _cases() -> list[tuple[str, str, str, str]]:
    cases = []
    for name, (_, opts) in COMMANDS.items():
        for a, b in itertools.permutations(opts, 2):
            if (name, frozenset({a, b})) in ALLOWED:
                continue
            for variant in ("same path", "symlink", "hard link", "not made yet"):
                if variant == "not made yet" and (a in POSITIONAL or b in POSITIONAL):
                    continue
                cases.append((name, a, b, variant))
    return cases


@pytest.mark.parametrize(("command", "a", "b", "variant"), _cases())
def test_two_options_naming_one_file_are_refused(
    tmp_path: Path, command: str, a: str, b: str, variant: str
) -> None:
    base, opts = COMMANDS[command]
    paths = {opt: tmp_path / name for opt, name in opts.items()}
    for opt, p in paths.items():
        if opt == "--key":
            MasterKey.generate().save(p)
        else:
            p.write_bytes(f"the file of {opt}\n".encode())
    target = paths[a]
    alias = tmp_path / "alias" / target.name  # keeps the name's suffix (--model wants .cfg)
    alias.parent.mkdir()
    if variant == "not made yet":
        target.unlink()
    before = target.read_bytes() if target.exists() else None
    if variant == "same path":
        paths[b] = target
    elif variant == "hard link":
        os.link(target, alias)
        paths[b] = alias
    else:  # a symbolic link; dangling when the target is not made yet
        alias.symlink_to(target)
        paths[b] = alias
    res = run_cli(*_argv(base, paths))
    assert_one_line_error(res, a, b, "name the same file", code=2)
    if before is None:
        assert not target.exists()  # nothing created it
    else:
        assert target.read_bytes() == before  # byte-identical


def test_every_path_option_of_every_command_is_in_the_table() -> None:
    """A new path option must be added to COMMANDS (and so to the check)."""
    import click

    from plinius.cli import main

    path_params = set()
    for cmd_name, cmd in main.commands.items():
        sub = cmd.commands.items() if isinstance(cmd, click.Group) else [(cmd_name, cmd)]
        for name, c in sub:
            for p in c.params:
                if isinstance(p.type, click.Path):
                    path_params.add((name, p.opts[0]))
    covered = {
        (base[0], "--counter" if o == "--counter file:" else o)
        for base, opts in COMMANDS.values()
        for o in opts
    }
    # Directory options, each tested below or owning no names a file option could take;
    # keygen, models and rm have one path option only; ls writes nothing (a directory, a key).
    alone = {
        ("keygen", "out"), ("models", "--cfg"), ("status", "--attestation-root"),
        ("status", "--tsm-root"), ("demo", "--workdir"), ("demo", "--pm-dir"),
        ("bench", "--out"), ("bench", "--pm-dir"), ("bench", "--disk-dir"),
        ("keyserver", "--counter-dir"), ("crash-test", "--workdir"),
        ("export", "mirror"), ("inspect", "path"), ("ls", "directory"), ("ls", "--key"),
        ("rm", "paths"),
        ("train", "--durable-dir"),  # its copy and temporary files: tests/cli/test_durable.py
    }  # fmt: skip
    missing = path_params - covered - alone
    assert not missing, missing


# ---------------------------------------------------------------- the two reported attacks


@pytest.fixture
def job(shm_dir: Path) -> dict[str, Path]:
    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(100, 8, 8), dtype=np.uint8)
    seal_dataset(shm_dir / "d.pld", key, {"image": x, "label": (x[:, 0, 0] > 127).astype(np.int64)})
    return {"key": shm_dir / "k.key", "data": shm_dir / "d.pld", "mirror": shm_dir / "m.plm",
            "counter": shm_dir / "ctr", "dir": shm_dir}  # fmt: skip


def _train(job: dict[str, Path], *extra: str | Path) -> list[str | Path]:
    return ["train", "--key", job["key"], "--data", job["data"], "--mirror", job["mirror"],
            "--model", "cnn-tiny", "--batch-size", "32", "--threads", "1", "--steps", "3",
            "--counter", f"file:{job['counter']}", *extra]  # fmt: skip


def test_events_pointed_at_the_counter_file_are_refused_and_the_job_still_resumes(
    job: dict[str, Path],
) -> None:
    # Before the counter file exists (the first increment would create it) ...
    res = run_cli(*_train(job, "--events", job["counter"]))
    assert_one_line_error(res, "--counter file:", "--events", "name the same file", code=2)
    assert not job["counter"].exists() and not job["mirror"].exists()
    res = run_cli(*_train(job))
    assert res.exit_code == 0, res.output
    before = job["counter"].read_bytes()
    # ... and after, directly and through a symbolic link.
    link = job["dir"] / "events.jsonl"
    link.symlink_to(job["counter"])
    for events in (job["counter"], link):
        res = run_cli(*_train(job, "--events", events))
        assert_one_line_error(res, "--counter file:", "--events", "name the same file", code=2)
        assert job["counter"].read_bytes() == before
    res = run_cli(*_train(job))  # the job resumes: the counter is intact
    assert res.exit_code == 0 and "resumed after step 3 of 3" in res.stdout, res.output


def test_keyserver_audit_log_pointed_at_the_master_key_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "owner.key"
    MasterKey.generate().save(key)
    before = key.read_bytes()
    policy = tmp_path / "policy.toml"
    policy.write_text("allow_simulation = false\n")
    hard = tmp_path / "audit.log"
    os.link(key, hard)
    for audit in (key, hard):
        res = run_cli(
            "keyserver", "--key", key, "--policy", policy, "--identity", tmp_path / "id.pem",
            "--audit-log", audit, "--host", "203.0.113.7",
        )  # fmt: skip
        assert_one_line_error(res, "--key", "--audit-log", "name the same file", code=2)
        assert key.read_bytes() == before
    MasterKey.load(key)  # still loads
    assert not (tmp_path / "id.pem").exists()  # refused before anything was created


def test_files_a_directory_option_keeps_are_refused(tmp_path: Path) -> None:
    key = tmp_path / "owner.key"
    MasterKey.generate().save(key)
    policy = tmp_path / "policy.toml"
    policy.write_text("allow_simulation = false\n")
    ctr = tmp_path / "counters"
    ctr.mkdir()
    base = ["keyserver", "--key", key, "--policy", policy, "--identity", tmp_path / "id.pem",
            "--counter-dir", ctr, "--host", "203.0.113.7"]  # fmt: skip
    for audit in (ctr / ".lock", ctr / ("0" * 40 + ".json")):
        res = run_cli(*base, "--audit-log", audit)
        assert_one_line_error(res, "--audit-log", "--counter-dir", "a file it keeps", code=2)
    from plinius.cli._paths import owned_by_counter_dir

    assert owned_by_counter_dir("." + "a" * 40 + ".json.0123abcd.tmp")  # write_atomic's temp
    res = run_cli(*base[:6], ctr / ".lock", *base[7:])
    assert_one_line_error(res, "--identity", "--counter-dir", "a file it keeps", code=2)
    # Another file in that directory is fine (the server then fails to listen here).
    res = run_cli(*base, "--audit-log", ctr / "audit.jsonl")
    assert res.exit_code == 1 and "cannot listen on 203.0.113.7" in res.stderr, res.output


def test_crash_test_workdir_files_are_refused(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    MasterKey.generate().save(key)
    (tmp_path / "wd").mkdir()
    res = run_cli(
        "crash-test", "--key", key, "--data", tmp_path / "d.pld",
        "--mirror", tmp_path / "wd" / "events.jsonl", "--workdir", tmp_path / "wd",
    )  # fmt: skip
    assert_one_line_error(res, "--mirror", "--workdir", code=2)


def test_one_pem_for_tls_cert_and_key_is_allowed(tmp_path: Path) -> None:
    key = tmp_path / "owner.key"
    MasterKey.generate().save(key)
    policy = tmp_path / "policy.toml"
    policy.write_text("allow_simulation = false\n")
    pem = tmp_path / "both.pem"
    pem.write_text("not a PEM\n")
    res = run_cli(
        "keyserver", "--key", key, "--policy", policy, "--identity", tmp_path / "id.pem",
        "--tls-cert", pem, "--tls-key", pem,
    )  # fmt: skip
    # Past the check: the PEM itself is bad.
    assert res.exit_code == 1 and "error: cannot load the TLS" in res.stderr, res.output


def test_the_sealed_keys_simkey_is_one_of_the_files(tmp_path: Path) -> None:
    sealed = tmp_path / "job.sealed"
    res = run_cli(
        "train", "--key-server", "http://127.0.0.1:1", "--key-server-pubkey", _PUBKEY,
        "--sealed-key", sealed, "--events", f"{sealed}.simkey", "--data", tmp_path / "d.pld",
        "--mirror", tmp_path / "m.plm", "--model", "cnn-tiny", "--steps", "1",
    )  # fmt: skip
    assert_one_line_error(res, "--sealed-key's .simkey", "--events", code=2)
