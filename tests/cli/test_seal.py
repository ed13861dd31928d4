"""`plinius seal`: happy paths for every source, bad input with exit codes and one-line errors."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result

from plinius.crypto import MasterKey
from plinius.data import SealedDataset
from tests.conftest import run_cli


@pytest.fixture
def keyfile(tmp_path: Path, key: MasterKey) -> Path:
    p = tmp_path / "owner.key"
    key.save(p)
    return p


def _dataset_id(result: Result) -> str:
    m = re.search(r"dataset id: ([0-9a-f]{32})", result.stdout)
    assert m, result.stdout
    return m.group(1)


def _one_line_error(result: Result, code: int, match: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    if code == 1:
        assert "\n" not in err and err.startswith("error: "), err
        assert "Traceback" not in result.output
    assert re.search(match, err), err


def test_help_is_documented() -> None:
    r = run_cli("seal", "--help")
    assert r.exit_code == 0
    for opt in ("--key", "--out", "--builtin", "--npz", "--idx-images", "--idx-labels", "--csv",
                "--label-column", "--overwrite", "--chunk-records"):  # fmt: skip
        assert opt in r.stdout


def test_seal_builtin_digits(tmp_path: Path, keyfile: Path, key: MasterKey) -> None:
    out = tmp_path / "digits.pld"
    r = run_cli("seal", "--key", keyfile, "--out", out, "--builtin", "digits")
    assert r.exit_code == 0, r.output
    assert f"sealed 1797 records into {out}" in r.stdout
    assert "field image: uint8 (8, 8)" in r.stdout and "field label: int64 ()" in r.stdout
    assert key.fingerprint.hex() in r.stdout
    with SealedDataset(out, key, expect_id=_dataset_id(r)) as ds:
        image, label = ds.get_batch(range(len(ds)))
        assert int(image.max()) == 255 and image.shape == (1797, 8, 8)
        assert sorted(set(label.tolist())) == list(range(10))
        assert [f.name for f in ds.fields] == ["image", "label"]


def test_seal_npz_with_chunking(tmp_path: Path, keyfile: Path, key: MasterKey) -> None:
    src = tmp_path / "d.npz"
    x, y = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32), np.arange(50)
    np.savez(src, x=x, y=y)
    out = tmp_path / "d.pld"
    r = run_cli("seal", "--key", keyfile, "--out", out, "--npz", src, "--chunk-records", "7")
    assert r.exit_code == 0, r.output
    with SealedDataset(out, key, expect_id=_dataset_id(r)) as ds:
        assert ds.chunk_records == 7 and ds.num_chunks == 8
        gx, gy = ds.get_batch(range(50))
        assert np.array_equal(gx.numpy(), x) and np.array_equal(gy.numpy(), y)


def test_seal_idx_gz(tmp_path: Path, keyfile: Path, key: MasterKey) -> None:
    x = np.random.default_rng(1).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    y = np.arange(20, dtype=np.uint8) % 10
    (tmp_path / "i.gz").write_bytes(
        gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">III", 20, 28, 28) + x.tobytes())
    )
    (tmp_path / "l").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 20) + y.tobytes())
    out = tmp_path / "m.pld"
    r = run_cli("seal", "--key", keyfile, "--out", out, "--idx-images", tmp_path / "i.gz",
             "--idx-labels", tmp_path / "l")  # fmt: skip
    assert r.exit_code == 0, r.output
    with SealedDataset(out, key) as ds:
        gx, gy = ds.get_batch(range(20))
        assert np.array_equal(gx.numpy(), x) and gy.tolist() == y.tolist()


def test_seal_csv(tmp_path: Path, keyfile: Path, key: MasterKey) -> None:
    (tmp_path / "d.csv").write_text("f1,f2,cls\n0.5,1,2\n3,4,0\n", encoding="utf-8")
    out = tmp_path / "c.pld"
    r = run_cli("seal", "--key", keyfile, "--out", out, "--csv", tmp_path / "d.csv",
             "--label-column", "cls")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "field features: float32 (2,)" in r.stdout
    with SealedDataset(out, key) as ds:
        f, label = ds.get_batch([0, 1])
        assert f.tolist() == [[0.5, 1.0], [3.0, 4.0]] and label.tolist() == [2, 0]


def test_existing_output_and_overwrite(tmp_path: Path, keyfile: Path) -> None:
    out = tmp_path / "d.pld"
    assert run_cli("seal", "--key", keyfile, "--out", out, "--builtin", "digits").exit_code == 0
    before = out.read_bytes()
    r = run_cli("seal", "--key", keyfile, "--out", out, "--builtin", "digits")
    _one_line_error(r, 1, "already exists; choose another path or pass --overwrite")
    assert out.read_bytes() == before
    r = run_cli("seal", "--key", keyfile, "--out", out, "--builtin", "digits", "--overwrite")
    assert r.exit_code == 0 and out.read_bytes() != before


def test_progress_bar_path(
    tmp_path: Path, keyfile: Path, key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    import plinius.cli.data as cli_data

    monkeypatch.setattr(cli_data, "_PROGRESS_BYTES", 0)  # show the bar even for digits
    out = tmp_path / "d.pld"
    r = run_cli(
        "seal", "--key", keyfile, "--out", out, "--builtin", "digits", "--chunk-records", "9"
    )
    assert r.exit_code == 0, r.output
    with SealedDataset(out, key) as ds:
        ds.verify()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ([], "exactly one source"),
        (["--builtin", "digits", "--npz", "x.npz"], r"got --builtin, --npz"),
        (["--idx-images", "i"], "go together"),
        (["--idx-labels", "l"], "go together"),
        (["--csv", "d.csv"], "go together"),
        (["--builtin", "digits", "--label-column", "y"], "go together"),
        (["--builtin", "mnist"], "Invalid value"),
        (["--builtin", "digits", "--chunk-records", "0"], "Invalid value"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, keyfile: Path, args: list[str], match: str) -> None:
    r = run_cli("seal", "--key", keyfile, "--out", tmp_path / "o.pld", *args)
    _one_line_error(r, 2, match)
    assert not (tmp_path / "o.pld").exists()


def test_missing_required_options() -> None:
    r = run_cli("seal", "--builtin", "digits")
    assert r.exit_code == 2 and "--key" in r.stderr


def test_bad_input_exits_1_with_one_line(tmp_path: Path, keyfile: Path) -> None:
    (tmp_path / "bad.csv").write_text("a,label\n1,2\n1,x\n", encoding="utf-8")
    (tmp_path / "uneven.npz").write_bytes(b"")
    np.savez(tmp_path / "uneven.npz", x=np.ones(3), y=np.ones(4))
    (tmp_path / "img").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 5, 2, 2) + bytes(3))
    (tmp_path / "lab").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + bytes(5))
    cases = [
        (["--csv", tmp_path / "bad.csv", "--label-column", "label"], "line 3: label column"),
        (["--csv", tmp_path / "bad.csv", "--label-column", "cls"], "no column 'cls'"),
        (["--npz", tmp_path / "uneven.npz"], "same first dimension"),
        (["--npz", tmp_path / "missing.npz"], "does not exist"),
        (["--idx-images", tmp_path / "img", "--idx-labels", tmp_path / "lab"], "truncated IDX"),
    ]
    for args, match in cases:
        out = tmp_path / "o.pld"
        r = run_cli("seal", "--key", keyfile, "--out", out, *args)
        _one_line_error(r, 1, match)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bad_paths_and_keys(tmp_path: Path, keyfile: Path) -> None:
    r = run_cli("seal", "--key", keyfile, "--out", tmp_path / "no" / "o.pld", "--builtin", "digits")
    _one_line_error(r, 1, "does not exist; create it first")
    r = run_cli("seal", "--key", tmp_path / "none.key", "--out", tmp_path / "o.pld", "--builtin",
             "digits")  # fmt: skip
    _one_line_error(r, 1, "plinius keygen")
    loose = tmp_path / "loose.key"
    loose.write_bytes(bytes(32))
    loose.chmod(0o644)
    r = run_cli("seal", "--key", loose, "--out", tmp_path / "o.pld", "--builtin", "digits")
    _one_line_error(r, 1, "chmod 600")
    assert not (tmp_path / "o.pld").exists()
