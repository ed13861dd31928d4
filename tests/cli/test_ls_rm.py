"""`plinius ls DIR`, `plinius rm PATH...` and the `--json` of `inspect` and `seal`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from plinius import _magic
from plinius.crypto import MasterKey
from plinius.data import seal_dataset
from plinius.mirror import Mirror
from tests.conftest import assert_one_line_error, run_cli

# Every file `ls --json` lists has exactly these keys (the README documents them).
LS_KEYS = {
    "name", "path", "kind", "size", "modified_at", "generation", "step", "model",
    "total_steps", "dataset_id", "records", "authenticated", "error",
}  # fmt: skip


@pytest.fixture
def job(shm_dir: Path) -> dict[str, Path]:
    """A directory with a key, a sealed dataset, a 3-step mirror and files that are neither."""
    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(64, 4, 4), dtype=np.uint8)
    seal_dataset(shm_dir / "d.pld", key, {"x": x, "y": (x[:, 0, 0] > 127).astype(np.int64)})
    res = run_cli("train", "--key", shm_dir / "k.key", "--data", shm_dir / "d.pld",
                  "--mirror", shm_dir / "m.plm", "--model", "mlp", "--steps", "3",
                  "--batch-size", "16", "--threads", "1")  # fmt: skip
    assert res.exit_code == 0, res.output
    (shm_dir / "notes.txt").write_text("not plinius\n")
    (shm_dir / "sub").mkdir()
    os.symlink(shm_dir / "m.plm", shm_dir / "link.plm")
    os.mkfifo(shm_dir / "fifo")  # would block a reader that opened it
    return {"dir": shm_dir, "key": shm_dir / "k.key", "data": shm_dir / "d.pld",
            "mirror": shm_dir / "m.plm"}  # fmt: skip


def _rows(out: str) -> dict[str, str]:
    """``ls``'s table rows by file name (the size is two words, the time three)."""
    return {
        line.split()[8]: line
        for line in out.splitlines()[1:]
        if line.startswith(("mirror ", "dataset "))
    }


def test_ls_without_key_lists_kind_generation_size_and_skips_the_rest(
    job: dict[str, Path],
) -> None:
    res = run_cli("ls", job["dir"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == [
        "KIND", "STEP", "GEN", "SIZE", "MODIFIED", "NAME", "JOB", "/", "DATA"
    ]  # fmt: skip
    rows = _rows(res.stdout)
    assert sorted(rows) == ["d.pld", "m.plm"]  # key, text, dir, symlink, FIFO: skipped
    mirror = rows["m.plm"].split()
    assert mirror[:3] == ["mirror", "?", "3"]  # the step is encrypted; the generation is not
    assert "KiB" in rows["m.plm"] and "UTC" in rows["m.plm"]
    assert "64 records, dataset id" in rows["d.pld"]
    assert f"{job['dir']}: 1 mirror(s), 1 sealed dataset(s); 5 other file(s) skipped" in lines
    assert lines[-1] == "a mirror's step and job are encrypted: pass --key KEY to read them"


def test_ls_with_key_reads_each_mirrors_step_and_job(job: dict[str, Path]) -> None:
    ds_id = json.loads(run_cli("inspect", job["data"], "--json").stdout)["dataset_id"]
    res = run_cli("ls", job["dir"], "--key", job["key"])
    assert res.exit_code == 0, res.output
    row = _rows(res.stdout)["m.plm"]
    assert row.split()[:3] == ["mirror", "3", "3"]
    assert row.endswith(f"m.plm  model mlp, 3 steps in all, trained on dataset {ds_id}")
    assert "encrypted" not in res.stdout


def test_ls_lists_unreadable_files_with_a_reason(job: dict[str, Path], shm_dir: Path) -> None:
    (shm_dir / "torn.plm").write_bytes(_magic.MIRROR + b"\0" * 100)  # a mirror's magic, no more
    (shm_dir / "torn.pld").write_bytes(_magic.DATASET + b"\1" * 10)
    other = shm_dir / "other.key"
    MasterKey.generate().save(other)
    res = run_cli("ls", shm_dir, "--key", other)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    rows = _rows(res.stdout)
    assert "unreadable: " in rows["torn.plm"] and "unreadable: " in rows["torn.pld"]
    # Written under another key: the header still gives the generation; the reason is one line.
    assert "unreadable: " in rows["m.plm"] and "another master key" in rows["m.plm"]
    assert rows["m.plm"].split()[:3] == ["mirror", "-", "3"]


def test_ls_says_a_mirror_is_in_use_by_a_running_job(job: dict[str, Path]) -> None:
    with Mirror(job["mirror"], MasterKey.load(job["key"])):  # a writer holds the lock
        res = run_cli("ls", job["dir"], "--key", job["key"])
    assert res.exit_code == 0, res.output
    assert "unreadable: " in _rows(res.stdout)["m.plm"] and "in use" in res.stdout


def test_ls_json_is_one_document_with_stable_keys(job: dict[str, Path]) -> None:
    for extra in ([], ["--key", str(job["key"])]):
        res = run_cli("ls", job["dir"], "--json", *extra)
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout)
        assert set(doc) == {"directory", "key_given", "files", "skipped"}
        assert doc["key_given"] is bool(extra)
        assert [f["name"] for f in doc["files"]] == ["d.pld", "m.plm"]
        assert all(set(f) == LS_KEYS for f in doc["files"])
        assert doc["skipped"] == ["fifo", "k.key", "link.plm", "notes.txt", "sub"]
        m = doc["files"][1]
        assert m["kind"] == "mirror" and m["generation"] == 3 and m["error"] is None
        assert m["size"] == job["mirror"].stat().st_size
        want = (3, "mlp", 3) if extra else (None, None, None)
        assert (m["step"], m["model"], m["total_steps"]) == want


def test_ls_of_a_missing_directory_is_a_usage_error(shm_dir: Path) -> None:
    assert_one_line_error(run_cli("ls", shm_dir / "nope"), code=2)


def test_rm_removes_mirrors_and_datasets_once_each(job: dict[str, Path]) -> None:
    res = run_cli("rm", job["mirror"], job["data"], job["mirror"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].startswith(f"removed {job['mirror']} (mirror, ")
    assert res.stdout.splitlines()[1].startswith(f"removed {job['data']} (dataset, ")
    assert len(res.stdout.splitlines()) == 2
    assert not job["mirror"].exists() and not job["data"].exists()
    assert job["key"].exists()


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("k.key", "not a plinius file"),
        ("notes.txt", "not a plinius file"),
        ("sealed.key", "a sealed master key"),
        ("sub", "not a regular file"),
        ("fifo", "not a regular file"),
        ("link.plm", "symbolic link"),
        ("missing.plm", "No such file"),
    ],
)
def test_rm_refuses_anything_else_and_removes_nothing(
    job: dict[str, Path], name: str, needle: str
) -> None:
    (job["dir"] / "sealed.key").write_bytes(_magic.SEALED_KEY + b"\0" * 64)
    before = sorted(p.name for p in job["dir"].iterdir())
    # The valid files come first: the refusal still removes none of them.
    res = run_cli("rm", job["mirror"], job["data"], job["dir"] / name)
    assert_one_line_error(res, needle, "(nothing removed)")
    assert sorted(p.name for p in job["dir"].iterdir()) == before


@pytest.mark.parametrize("readonly", [False, True])
def test_rm_refuses_a_mirror_that_a_job_has_open(job: dict[str, Path], readonly: bool) -> None:
    with Mirror(job["mirror"], MasterKey.load(job["key"]), readonly=readonly):
        res = run_cli("rm", job["data"], job["mirror"])
        assert_one_line_error(res, "is in use by another process", "(nothing removed)")
    assert job["mirror"].exists() and job["data"].exists()
    # Released: now it goes, and a job can no longer open what was removed.
    assert run_cli("rm", job["mirror"]).exit_code == 0
    assert not job["mirror"].exists()


def test_inspect_json_of_a_mirror_without_and_with_the_key(job: dict[str, Path]) -> None:
    res = run_cli("inspect", job["mirror"], "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    keys = set(doc)
    assert doc["kind"] == "mirror" and doc["generation"] == 3
    assert doc["authenticated"] is False and doc["step"] is None and doc["job"] is None
    res = run_cli("inspect", job["mirror"], "--json", "--key", job["key"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == keys  # the same keys with and without the key
    assert (
        doc["authenticated"] is True
        and doc["step"] == 3
        and doc["num_tensors"] == len(doc["tensors"])
    )
    assert doc["job"]["model"] == "mlp" and doc["job"]["total_steps"] == 3
    assert doc["job"]["settings"]["batch_size"] == 16
    assert doc["freshness_checked"] is False


def test_inspect_json_of_a_dataset_and_errors_stay_one_line(job: dict[str, Path]) -> None:
    doc = json.loads(run_cli("inspect", job["data"], "--json").stdout)
    assert (doc["kind"], doc["records"], doc["authenticated"]) == ("dataset", 64, False)
    assert [f["name"] for f in doc["fields"]] == ["x", "y"]
    doc = json.loads(run_cli("inspect", job["data"], "--json", "--key", job["key"]).stdout)
    assert doc["authenticated"] is True and doc["verified"] is True
    res = run_cli("inspect", job["dir"] / "notes.txt", "--json")
    assert_one_line_error(res, "neither a plinius mirror nor a sealed dataset")
    assert res.stdout == ""


def test_seal_json(job: dict[str, Path]) -> None:
    out = job["dir"] / "digits.pld"
    res = run_cli("seal", "--key", job["key"], "--out", out, "--builtin", "digits", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == {"path", "records", "dataset_id", "fields", "key_fingerprint"}
    assert doc["records"] == 1797 and doc["path"] == str(out)
    assert doc["fields"] == [
        {"name": "image", "dtype": "uint8", "shape": [8, 8]},
        {"name": "label", "dtype": "int64", "shape": []},
    ]
    assert doc["dataset_id"] == json.loads(run_cli("inspect", out, "--json").stdout)["dataset_id"]


def test_inspect_with_key_names_the_job(job: dict[str, Path]) -> None:
    ds_id = json.loads(run_cli("inspect", job["data"], "--json").stdout)["dataset_id"]
    res = run_cli("inspect", job["mirror"], "--key", job["key"])
    assert res.exit_code == 0, res.output
    assert f"  job              model mlp, 3 steps in all, trained on dataset {ds_id}" in (
        res.stdout.splitlines()
    )


def test_json_output_is_strict_json(capsys: pytest.CaptureFixture[str]) -> None:
    from plinius.cli._json import echo_json

    echo_json({"loss": float("nan"), "inf": [float("inf")], "raw": b"\x01", "t": (1, 2)})
    # A diverged loss is null, not the NaN that strict parsers refuse.
    doc = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)
    assert doc == {"loss": None, "inf": [None], "raw": "b'\\x01'", "t": [1, 2]}
