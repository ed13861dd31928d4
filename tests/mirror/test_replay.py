"""What a replay of an older root can and cannot do (issue 17, item 2), exactly.

The previous generation's root slot and the commit word that named it are 4 KiB
and 8 bytes that a host can keep from an earlier snapshot of the file. Once the
next save has committed, the previous generation's tensors are still in their
slots (a save writes the *other* slot of each pair), so putting those bytes back
gives an authentic file of the previous step: the same file the host could have
kept whole. No format can refuse that without a trusted counter; with one, it is
a rollback. These tests pin both halves, so the documents can say exactly this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from plinius.counters import FileCounter
from plinius.crypto import MasterKey
from plinius.errors import IntegrityError, RollbackError
from plinius.mirror import Mirror
from plinius.mirror import _format as fmt


def _state(v: float) -> dict[str, Any]:
    return {"w": torch.full((64,), v), "step_note": v}


def _put_back_previous_root(path: Path, snapshot: bytes, slot: int) -> None:
    data = bytearray(path.read_bytes())
    off = fmt.ROOT_OFFSETS[slot]
    data[off : off + fmt.ROOT_SIZE] = snapshot[off : off + fmt.ROOT_SIZE]
    data[fmt.COMMIT_OFFSET : fmt.COMMIT_OFFSET + 8] = snapshot[
        fmt.COMMIT_OFFSET : fmt.COMMIT_OFFSET + 8
    ]
    path.write_bytes(bytes(data))


def _snapshot_then_one_more_save(
    path: Path, key: MasterKey, counter: FileCounter | None
) -> tuple[bytes, int]:
    kwargs: dict[str, Any] = {} if counter is None else {"counter": counter}
    with Mirror(path, key, **kwargs) as m:
        m.save(_state(1.0), step=1)
        m.save(_state(2.0), step=2)
        slot = m._manifest.slot
    snapshot = path.read_bytes()  # the host keeps a copy at step 2
    with Mirror(path, key, **kwargs) as m:
        m.save(_state(3.0), step=3)
        assert m._manifest.slot != slot
    return snapshot, slot


def test_without_a_counter_the_previous_root_put_back_restores_the_previous_step(
    shm_dir: Path, key: MasterKey
) -> None:
    path = shm_dir / "m.plm"
    snapshot, slot = _snapshot_then_one_more_save(path, key, None)
    _put_back_previous_root(path, snapshot, slot)
    target = _state(0.0)
    with Mirror(path, key, readonly=True) as m:
        # Not detectable: an authentic older state, as a whole old file would be.
        assert m.verify().step == 2
        assert m.restore(target) == 2
    assert torch.equal(target["w"], torch.full((64,), 2.0))


def test_with_a_counter_the_previous_root_put_back_is_a_rollback(
    shm_dir: Path, key: MasterKey
) -> None:
    path = shm_dir / "m.plm"
    counter = FileCounter(shm_dir / "counter")
    snapshot, slot = _snapshot_then_one_more_save(path, key, counter)
    _put_back_previous_root(path, snapshot, slot)
    with pytest.raises(RollbackError, match="rollback"):
        Mirror(path, key, readonly=True, counter=counter)
    with pytest.raises(RollbackError):
        Mirror(path, key, counter=counter)


def test_the_root_alone_put_back_is_refused_even_without_a_counter(
    shm_dir: Path, key: MasterKey
) -> None:
    # Without the old commit word the replayed root names another generation
    # than the commit word does: never a silent fallback.
    path = shm_dir / "m.plm"
    snapshot, slot = _snapshot_then_one_more_save(path, key, None)
    data = bytearray(path.read_bytes())
    off = fmt.ROOT_OFFSETS[slot]
    data[off : off + fmt.ROOT_SIZE] = snapshot[off : off + fmt.ROOT_SIZE]
    path.write_bytes(bytes(data))
    with Mirror(path, key, readonly=True) as m:
        assert m.verify().step == 3  # the committed root is the other slot: unharmed
    # and the commit word alone, rewound, names a root that was wiped
    data = bytearray(path.read_bytes())
    data[off : off + fmt.ROOT_SIZE] = bytes(fmt.ROOT_SIZE)
    data[fmt.COMMIT_OFFSET : fmt.COMMIT_OFFSET + 8] = snapshot[
        fmt.COMMIT_OFFSET : fmt.COMMIT_OFFSET + 8
    ]
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        Mirror(path, key, readonly=True)
