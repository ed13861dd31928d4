"""``plinius inspect`` and ``plinius export`` on mirror files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plinius.crypto import MasterKey
from plinius.mirror import Mirror
from tests.conftest import run_cli


@pytest.fixture
def job(shm_dir: Path) -> tuple[Path, Path, torch.nn.Module]:
    key = MasterKey.generate()
    key_path = shm_dir / "owner.key"
    key.save(key_path)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    path = shm_dir / "job.plm"
    with Mirror(path, key) as m:
        m.save({"model": model, "epoch": 2, "ema": torch.ones(2)}, step=42)
    return path, key_path, model


def test_inspect_without_key_shows_the_header_and_asks_for_the_key(
    job: tuple[Path, Path, torch.nn.Module],
) -> None:
    path, _, _ = job
    res = run_cli("inspect", str(path))
    assert res.exit_code == 0, res.output
    assert "plinius mirror, format version 1" in res.output
    assert "committed        generation 1" in res.output
    assert "pass --key" in res.output and "model.0.weight" not in res.output


def test_inspect_with_key_lists_tensors_and_verifies(
    job: tuple[Path, Path, torch.nn.Module],
) -> None:
    path, key_path, _ = job
    res = run_cli("inspect", str(path), "--key", str(key_path))
    assert res.exit_code == 0, res.output
    assert "step             42" in res.output
    assert (
        "model.0.weight  float32  4x3" in res.output
        and "model.1.num_batches_tracked  int64  scalar" in res.output
    )
    assert "verified" in res.output and "all 8 tensors" in res.output


def test_inspect_reports_damage_and_wrong_keys_in_one_line(
    job: tuple[Path, Path, torch.nn.Module], shm_dir: Path
) -> None:
    path, key_path, _ = job
    other = shm_dir / "other.key"
    MasterKey.generate().save(other)
    res = run_cli("inspect", str(path), "--key", str(other))
    assert res.exit_code == 1 and "another master key" in res.output
    with Mirror(path, MasterKey.load(key_path), readonly=True) as m:
        e = m._manifest.entries[0]
    data = bytearray(path.read_bytes())
    data[e.offset] ^= 1
    path.write_bytes(bytes(data))
    res = run_cli("inspect", str(path), "--key", str(key_path))
    assert res.exit_code == 1 and "fails authentication" in res.output
    assert len(res.output.strip().splitlines()) == 1
    junk = shm_dir / "junk"
    junk.write_bytes(b"hello world")
    res = run_cli("inspect", str(junk))
    assert res.exit_code == 1 and "neither a plinius mirror nor a sealed dataset" in res.output


def test_inspect_dispatches_sealed_datasets(shm_dir: Path) -> None:
    pytest.importorskip("plinius.data")
    from plinius.data import seal_dataset

    key = MasterKey.generate()
    key.save(shm_dir / "k")
    ds = shm_dir / "d.pld"
    try:
        seal_dataset(ds, key, {"x": torch.zeros(4, 2)})
    except Exception as exc:  # pragma: no cover - another module's API
        pytest.skip(f"seal_dataset API differs: {exc}")
    res = run_cli("inspect", str(ds))
    assert res.exit_code == 0, res.output
    assert "mirror" not in res.output.splitlines()[0]


def test_export_writes_the_model_without_prefix_and_never_overwrites(
    job: tuple[Path, Path, torch.nn.Module], shm_dir: Path
) -> None:
    path, key_path, model = job
    out = shm_dir / "model.safetensors"
    res = run_cli("export", str(path), "--key", str(key_path), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "plaintext" in res.output
    tensors = load_file(out)
    assert sorted(tensors) == sorted(model.state_dict())
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())
    before = out.read_bytes()
    res = run_cli("export", str(path), "--key", str(key_path), "--out", str(out))
    assert res.exit_code == 1 and "refusing to overwrite" in res.output
    assert out.read_bytes() == before
    assert not [p for p in shm_dir.iterdir() if p.name.endswith(".tmp")]


def test_export_of_a_state_without_model_writes_everything(shm_dir: Path) -> None:
    key = MasterKey.generate()
    key.save(shm_dir / "k")
    with Mirror(shm_dir / "x.plm", key) as m:
        m.save({"a": torch.ones(2), "b": {"c": torch.zeros(3)}}, step=1)
    out = shm_dir / "all.safetensors"
    res = run_cli("export", str(shm_dir / "x.plm"), "--key", str(shm_dir / "k"), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert sorted(load_file(out)) == ["a", "b.c"]
    with Mirror(shm_dir / "y.plm", key):
        pass
    res = run_cli(
        "export",
        str(shm_dir / "y.plm"),
        "--key",
        str(shm_dir / "k"),
        "--out",
        str(shm_dir / "y.st"),
    )
    assert res.exit_code == 1 and "nothing to export" in res.output
