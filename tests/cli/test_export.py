"""``plinius export``: deterministic bytes and self-describing metadata (issue 18, item 9)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from plinius.crypto import MasterKey
from plinius.data import seal_dataset
from plinius.job import write_safetensors
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def trained(shm_dir: Path) -> dict[str, Path]:
    """A mirror of cnn-tiny trained 3 steps on (6, 6) uint8 images of 3 classes."""
    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    rng = np.random.default_rng(5)
    x = rng.integers(0, 255, size=(60, 6, 6), dtype=np.uint8)
    seal_dataset(shm_dir / "d.pld", key, {"image": x, "label": np.arange(60) % 3})
    ws = {"key": shm_dir / "k.key", "data": shm_dir / "d.pld", "mirror": shm_dir / "m.plm"}
    res = run_cli(
        "train", "--key", ws["key"], "--data", ws["data"], "--mirror", ws["mirror"],
        "--model", "cnn-tiny", "--batch-size", "20", "--threads", "1", "--no-progress",
        "--steps", "3",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return ws


def _export(ws: dict[str, Path], out: Path) -> bytes:
    res = run_cli("export", ws["mirror"], "--key", ws["key"], "--out", out)
    assert res.exit_code == 0, res.output
    return out.read_bytes()


def test_two_exports_of_one_mirror_are_byte_identical(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    a = _export(trained, tmp_path / "a.safetensors")
    b = _export(trained, tmp_path / "b.safetensors")
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()


def test_write_safetensors_sorts_the_header(tmp_path: Path) -> None:
    # safetensors' own writer orders metadata by a hash map: many keys expose it.
    meta = {f"k{i}": str(i) for i in range(40)}
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.int64)}
    outs = []
    for order in (meta, dict(reversed(meta.items()))):
        path = tmp_path / f"{len(outs)}.safetensors"
        write_safetensors(tensors, order, path)
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]
    n = int.from_bytes(outs[0][:8], "little")
    assert n % 8 == 0
    header = outs[0][8 : 8 + n].rstrip(b" ")
    keys = list(json.loads(header)["__metadata__"])
    assert keys == sorted(keys)


def test_the_export_says_how_to_rebuild_the_model(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    _export(trained, out)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["plinius_model"] == "cnn-tiny"
    assert json.loads(meta["plinius_input_shape"]) == [6, 6]
    assert meta["plinius_num_classes"] == "3"
    assert meta["plinius_input_scale"] == "255.0"
    assert meta["plinius_step"] == "3"
    job = json.loads(meta["plinius_job"])
    assert job["model"] == "cnn-tiny" and job["batch_size"] == 20 and job["seed"] == 0
    assert "plinius_cfg" not in meta


def test_the_readme_snippet_loads_the_export(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Using an exported model.**") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    _export(trained, tmp_path / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), scope)
    spec = scope["spec"]
    # The loaded module computes what the mirror's model computes.
    from plinius.mirror import Mirror
    from plinius.models import build_model

    ref = build_model("cnn-tiny", input_shape=(6, 6), num_classes=3)
    with Mirror(trained["mirror"], MasterKey.load(trained["key"]), readonly=True) as m:
        m.restore_model(ref.module)
    x = torch.randint(0, 255, (4, 6, 6), dtype=torch.uint8)
    got = spec.module.eval()(spec.prepare(x))  # type: ignore[attr-defined]
    torch.testing.assert_close(got, ref.module.eval()(ref.prepare(x)), rtol=0, atol=0)


def test_a_cfg_export_carries_the_cfg_text(shm_dir: Path, tmp_path: Path) -> None:
    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    x = np.random.default_rng(1).integers(0, 255, size=(40, 4, 4), dtype=np.uint8)
    seal_dataset(shm_dir / "d.pld", key, {"image": x, "label": np.arange(40) % 2})
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text("[net]\nheight=4\nwidth=4\nchannels=1\n[connected]\noutput=2\n[softmax]\n")
    args = [
        "train", "--key", shm_dir / "k.key", "--data", shm_dir / "d.pld", "--mirror",
        shm_dir / "m.plm", "--model", cfg, "--batch-size", "10", "--threads", "1",
        "--no-progress", "--steps", "2",
    ]  # fmt: skip
    assert run_cli(*args).exit_code == 0
    out = tmp_path / "c.safetensors"
    assert (
        run_cli("export", shm_dir / "m.plm", "--key", shm_dir / "k.key", "--out", out).exit_code
        == 0
    )
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["plinius_cfg"] == cfg.read_text()
    cfg.write_text(cfg.read_text() + "\n")  # changed since training: named, not carried
    res = run_cli(
        "export", shm_dir / "m.plm", "--key", shm_dir / "k.key", "--out", tmp_path / "d.st"
    )
    assert res.exit_code == 0 and "changed since training" in res.stderr
    with safe_open(str(tmp_path / "d.st"), "pt") as f:
        assert "plinius_cfg" not in f.metadata() and f.metadata()["plinius_model"] == str(cfg)
