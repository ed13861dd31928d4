"""plinius.dcp: DCP's storage writer and reader, encrypted; round trips and an attacker's edits."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import plinius.dcp
from plinius.counters import FileCounter
from plinius.crypto import MasterKey
from plinius.dcp import METADATA_NAME, PliniusReader, PliniusWriter, plinius_errors, read_info
from plinius.errors import (
    FormatError,
    IntegrityError,
    RollbackError,
    StorageError,
    WrongKeyError,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))


def _state(seed: int, step: int = 1) -> dict[str, Any]:
    m = _model(seed)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    for _ in range(step):
        m(torch.randn(2, 5)).sum().backward()
        opt.step()
    return {
        "model": m.state_dict(),
        "optim": opt.state_dict(),
        "step": step,
        "notes": {"losses": [0.5, 0.25], "name": "run"},
        "big": torch.arange(3000, dtype=torch.bfloat16).reshape(30, 100)[:, ::2],
    }


def _blank() -> dict[str, Any]:
    s = _state(99, step=1)
    for v in [*s["model"].values(), s["big"]]:
        v.zero_()
    s["big"] = torch.zeros(30, 50, dtype=torch.bfloat16)
    s["step"] = 0
    s["notes"] = {"losses": None, "name": None}
    return s


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _data_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.pdcp"))


def test_dcp_save_load_round_trip_with_torch_api(tmp_path: Path, key: MasterKey) -> None:
    want = _state(0, step=2)
    dcp.save(want, storage_writer=PliniusWriter(tmp_path / "c", key))
    got = _blank()
    dcp.load(got, storage_reader=PliniusReader(tmp_path / "c", key))
    assert _equal(got, want)
    # Nothing in plaintext: the weights' bytes appear in no file.
    needle = want["model"]["0.weight"].numpy().tobytes()[:64]
    for f in (tmp_path / "c").iterdir():
        assert needle not in f.read_bytes()
        assert f.stat().st_mode & 0o077 == 0


def test_async_save_commits_when_its_future_is_done(tmp_path: Path, key: MasterKey) -> None:
    want = _state(1)
    fut = plinius.dcp.async_save(want, tmp_path / "c", key)
    fut.result()
    got = _blank()
    plinius.dcp.load(got, tmp_path / "c", key)
    assert _equal(got, want)


def test_every_save_draws_a_new_checkpoint_key_and_replaces_the_old(
    tmp_path: Path, key: MasterKey
) -> None:
    d = tmp_path / "c"
    s = _state(2)
    plinius.dcp.save(s, d, key)
    first = read_info(d, key)
    old = _data_files(d)
    old_bytes = old[0].read_bytes()
    plinius.dcp.save(s, d, key)
    second = read_info(d, key)
    assert first is not None and second is not None
    assert second.sequence == first.sequence + 1
    assert second.checkpoint_id != first.checkpoint_id
    new = _data_files(d)
    # Same state, fresh key: no ciphertext repeats; the superseded file is gone.
    assert not set(old) & set(new)
    assert len(new) == 1
    new_bytes = new[0].read_bytes()
    assert len(new_bytes) == len(old_bytes)
    assert new_bytes[48:] != old_bytes[48:]


def test_a_crash_before_the_commit_keeps_the_previous_checkpoint(
    tmp_path: Path, key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "c"
    first = _state(3, step=1)
    plinius.dcp.save(first, d, key)
    committed = (d / METADATA_NAME).read_bytes()

    def crash(*args: object) -> None:
        raise KeyboardInterrupt  # the process dies before the metadata rename

    monkeypatch.setattr(PliniusWriter, "finish", crash)
    with pytest.raises(BaseException):  # noqa: B017  (DCP wraps it)
        plinius.dcp.save(_state(4, step=3), d, key)
    monkeypatch.undo()
    assert (d / METADATA_NAME).read_bytes() == committed
    assert len(_data_files(d)) == 2  # the new, uncommitted file is an orphan
    got = _blank()
    plinius.dcp.load(got, d, key)
    assert _equal(got, first)
    plinius.dcp.save(first, d, key)  # the next commit removes the orphan
    assert len(_data_files(d)) == 1


def _saved(tmp_path: Path, key: MasterKey, name: str = "c") -> Path:
    d = tmp_path / name
    plinius.dcp.save(_state(5), d, key)
    return d


def _load_error(d: Path, key: MasterKey, **kw: Any) -> BaseException:
    with pytest.raises(BaseException) as info:
        plinius.dcp.load(_blank(), d, key, **kw)
    return info.value


def test_wrong_key_is_named_and_a_save_under_it_overwrites_nothing(
    tmp_path: Path, key: MasterKey, other_key: MasterKey
) -> None:
    d = _saved(tmp_path, key)
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    assert isinstance(_load_error(d, other_key), WrongKeyError)
    with pytest.raises(WrongKeyError, match="another master key"):
        plinius.dcp.save(_state(6), d, other_key)
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before


@pytest.mark.parametrize("where", ["metadata-header", "metadata-body", "data-header", "item"])
def test_a_flipped_bit_anywhere_is_caught(tmp_path: Path, key: MasterKey, where: str) -> None:
    d = _saved(tmp_path, key)
    path = d / METADATA_NAME if where.startswith("metadata") else _data_files(d)[0]
    raw = bytearray(path.read_bytes())
    pos = {"metadata-header": 30, "metadata-body": 100, "data-header": 20, "item": 300}[where]
    raw[pos] ^= 0x01
    path.write_bytes(raw)
    err = _load_error(d, key)
    assert isinstance(err, IntegrityError | WrongKeyError | FormatError), err


def test_a_truncated_data_file_is_caught(tmp_path: Path, key: MasterKey) -> None:
    d = _saved(tmp_path, key)
    f = _data_files(d)[0]
    os.truncate(f, f.stat().st_size - 1)
    assert isinstance(_load_error(d, key), IntegrityError)


def test_items_swapped_or_spliced_inside_a_file_are_caught(tmp_path: Path, key: MasterKey) -> None:
    d = _saved(tmp_path, key)
    info = read_info(d, key)
    assert info is not None
    md = PliniusReader(d, key).read_metadata()
    items = sorted(md.storage_data.items.values(), key=lambda i: i.offset)
    # Two items of equal stored size (the two biases are not; the step tensors are).
    by_size: dict[int, list[Any]] = {}
    for it in items:
        by_size.setdefault(it.nbytes, []).append(it)
    a, b = next(v for v in by_size.values() if len(v) >= 2)[:2]
    f = d / a.file
    raw = bytearray(f.read_bytes())
    n = a.nbytes + 16
    raw[a.offset : a.offset + n], raw[b.offset : b.offset + n] = (
        raw[b.offset : b.offset + n],
        raw[a.offset : a.offset + n],
    )
    f.write_bytes(raw)
    assert isinstance(_load_error(d, key), IntegrityError)


def test_metadata_of_another_or_an_older_checkpoint_is_refused(
    tmp_path: Path, key: MasterKey
) -> None:
    d = _saved(tmp_path, key)
    older = (d / METADATA_NAME).read_bytes()
    other = _saved(tmp_path, key, "other")
    shutil.copy(other / METADATA_NAME, d / METADATA_NAME)
    err = _load_error(d, key)
    assert isinstance(err, IntegrityError) and "missing" in str(err)
    # A writer refuses to replace a checkpoint that does not authenticate.
    with pytest.raises(IntegrityError):
        plinius.dcp.save(_state(7), d, key)
    (d / METADATA_NAME).write_bytes(older)
    plinius.dcp.save(_state(7), d, key)
    good = (d / METADATA_NAME).read_bytes()
    (d / METADATA_NAME).write_bytes(older)  # an older metadata put back
    assert isinstance(_load_error(d, key), IntegrityError)
    # A data file of another checkpoint under the name the metadata gives.
    (d / METADATA_NAME).write_bytes(good)
    shutil.copy(_data_files(other)[0], d / _data_files(d)[0].name)
    err = _load_error(d, key)
    assert isinstance(err, IntegrityError) and "another checkpoint" in str(err)


def test_a_whole_directory_rolled_back_is_caught_by_the_counter(
    tmp_path: Path, key: MasterKey
) -> None:
    counter = FileCounter(tmp_path / "counter")
    d = tmp_path / "c"
    plinius.dcp.save(_state(8), d, key, counter=counter)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(d, snapshot)
    plinius.dcp.save(_state(9), d, key, counter=counter)
    plinius.dcp.load(_blank(), d, key, counter=counter)
    shutil.rmtree(d)
    shutil.copytree(snapshot, d)  # the host restores an authentic, older copy
    assert isinstance(_load_error(d, key, counter=counter), RollbackError)
    # Without the counter the old copy is authentic and loads: the counter is what catches it.
    plinius.dcp.load(_blank(), d, key)


def test_no_checkpoint_and_not_a_checkpoint(tmp_path: Path, key: MasterKey) -> None:
    assert isinstance(_load_error(tmp_path / "none", key), StorageError)
    d = tmp_path / "junk"
    d.mkdir()
    (d / METADATA_NAME).write_bytes(b"\x80\x04pickle" * 10)
    assert isinstance(_load_error(d, key), FormatError)


def test_the_torch_api_sees_the_plinius_message(tmp_path: Path, key: MasterKey) -> None:
    d = _saved(tmp_path, key)
    reader = PliniusReader(d, MasterKey.generate())
    with warnings.catch_warnings(), pytest.raises(WrongKeyError), plinius_errors(reader):
        warnings.simplefilter("ignore")
        dcp.load(_blank(), storage_reader=reader)
    # Without the helper DCP's own exception still carries the message.
    with pytest.raises(BaseException, match="another master key"):
        dcp.load(_blank(), storage_reader=PliniusReader(d, MasterKey.generate()))
