"""``plinius.mirror.describe_file`` and the one tensor record (``TensorMeta``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from plinius.crypto import MasterKey
from plinius.errors import FormatError, IntegrityError
from plinius.mirror import Mirror, MirrorHeader, TensorInfo, describe_file
from plinius.mirror import _format as fmt
from plinius.mirror._flatten import TensorSrc, flatten
from plinius.mirror._restore import SavedTensor

GOLDEN = Path(__file__).parent.parent / "fixtures" / "golden"


def test_describe_file_of_a_new_and_a_saved_mirror(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "m.plm"
    with Mirror(path, key) as m:
        info = m.info()
        h = describe_file(path)
        assert isinstance(h, MirrorHeader)
        assert (h.generation, h.slot, h.format_version) == (0, 0, fmt.FORMAT_VERSION)
        assert h.region_id.hex() == info.region_id
        assert h.fingerprint == key.fingerprint
        assert h.created_at == info.created_at
        assert h.file_bytes == path.stat().st_size
        m.save({"w": torch.ones(4)}, step=1)
    h = describe_file(str(path))
    assert (h.generation, h.slot, h.path) == (1, 1, path)


def test_describe_file_of_the_golden_mirror() -> None:
    h = describe_file(GOLDEN / "mirror.plm")
    assert h.generation == 3 and h.format_version == 1


def test_describe_file_refuses_what_is_not_a_mirror(tmp_path: Path, key: MasterKey) -> None:
    with pytest.raises(FormatError):
        describe_file(GOLDEN / "data.pld")
    path = tmp_path / "m.plm"
    Mirror(path, key).close()
    data = bytearray(path.read_bytes())
    data[fmt.COMMIT_OFFSET] ^= 1  # a flipped bit in the commit word fails its check
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        describe_file(path)


def test_one_tensor_record() -> None:
    fields = ["name", "kind", "dtype", "shape", "nbytes"]
    assert [f.name for f in dataclasses.fields(fmt.TensorMeta)] == fields
    assert [f.name for f in dataclasses.fields(fmt.Entry)][:5] == fields
    for cls in (fmt.Entry, TensorSrc, TensorInfo):
        assert issubclass(cls, fmt.TensorMeta)
    assert SavedTensor is fmt.TensorMeta
    _, (src,) = flatten({"w": torch.zeros(2, 3)})
    assert (src.name, src.kind, src.dtype, src.shape, src.nbytes) == (
        "w", "torch", "float32", (2, 3), 24,
    )  # fmt: skip


def test_tensor_info_stays_a_frozen_value() -> None:
    a = TensorInfo("w", "torch", "float32", (2,), 8)
    assert a == TensorInfo("w", "torch", "float32", (2,), 8) and hash(a) == hash(
        TensorInfo("w", "torch", "float32", (2,), 8)
    )
    assert repr(a) == "TensorInfo(name='w', kind='torch', dtype='float32', shape=(2,), nbytes=8)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.name = "v"  # type: ignore[misc]
