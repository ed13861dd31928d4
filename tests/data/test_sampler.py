"""SealedSampler: orders from (seed, epoch) only, exact resumption, chunk locality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plinius.crypto import MasterKey
from plinius.data import SealedDataset, SealedSampler, seal_dataset
from plinius.errors import ConfigError, StateMismatchError

MODES: list[Any] = ["chunk", "full", False]


def _epoch(s: SealedSampler) -> list[int]:
    return list(s)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("n", "r"), [(1, 1), (10, 3), (100, 7), (257, 16), (64, 64)])
def test_each_epoch_is_a_permutation(mode: Any, n: int, r: int) -> None:
    s = SealedSampler(n, seed=5, shuffle=mode, chunk_records=r)
    for e in range(3):
        s.set_epoch(e)
        order = _epoch(s)
        assert sorted(order) == list(range(n))
        assert len(s) == n
        if mode is False:
            assert order == list(range(n))


@pytest.mark.parametrize("mode", ["chunk", "full"])
def test_order_derives_from_seed_and_epoch_only(mode: Any) -> None:
    a = SealedSampler(500, seed=1, shuffle=mode, chunk_records=10)
    b = SealedSampler(500, seed=1, shuffle=mode, chunk_records=10)
    b.set_epoch(3)
    list(b)  # iterating another epoch first changes nothing
    b.set_epoch(0)
    assert _epoch(a) == _epoch(b)
    e0 = _epoch(a)
    a.set_epoch(1)
    assert _epoch(a) != e0
    c = SealedSampler(500, seed=2, shuffle=mode, chunk_records=10)
    assert _epoch(c) != e0
    assert _epoch(a) == _epoch(a)  # iterating twice: same order, position unchanged


def test_pinned_orders() -> None:
    """The order is part of resumption: changing the algorithm breaks old mirrors."""
    assert _epoch(SealedSampler(10, seed=0, shuffle="full")) == [9, 7, 5, 6, 8, 1, 2, 4, 3, 0]
    assert _epoch(SealedSampler(10, seed=0, shuffle="chunk", chunk_records=2, window_chunks=2)) == [
        7, 3, 6, 2,  # window 0: chunks 3 and 1 (records 6, 7 and 2, 3)
        9, 4, 8, 5,  # window 1: chunks 4 and 2
        1, 0,  # window 2: chunk 0
    ]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_iterating_does_not_advance(mode: Any) -> None:
    s = SealedSampler(50, seed=3, shuffle=mode, chunk_records=4)
    full = _epoch(s)
    list(s.batches(8))
    assert s.consumed == 0 and _epoch(s) == full
    s.advance(13)
    assert s.consumed == 13 and len(s) == 37
    assert _epoch(s) == full[13:]
    assert [i for b in s.batches(8) for i in b] == full[13:]
    s.advance(37)
    assert _epoch(s) == [] and list(s.batches(8)) == []
    with pytest.raises(ConfigError, match="set_epoch"):
        s.advance(1)
    s.set_epoch(1)
    assert s.consumed == 0 and s.epoch == 1


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 300),
    r=st.integers(1, 40),
    w=st.integers(1, 5),
    seed=st.integers(0, 2**64 - 1),
    epoch=st.integers(0, 50),
    data=st.data(),
)
def test_resumption_parity(
    mode: Any, n: int, r: int, w: int, seed: int, epoch: int, data: st.DataObject
) -> None:
    """A sampler restored from a state dict yields exactly the rest of the original order."""
    orig = SealedSampler(n, seed=seed, shuffle=mode, chunk_records=r, window_chunks=w)
    orig.set_epoch(epoch)
    full = _epoch(orig)
    consumed = data.draw(st.integers(0, n))
    orig.advance(consumed)
    state = json.loads(json.dumps(orig.state_dict()))  # what a mirror stores
    restored = SealedSampler(n, seed=0, shuffle=mode, chunk_records=r, window_chunks=w)
    restored.load_state_dict(state)
    assert (restored.seed, restored.epoch, restored.consumed) == (seed, epoch, consumed)
    assert _epoch(restored) == full[consumed:] == _epoch(orig)
    bs = data.draw(st.integers(1, 50))
    assert list(restored.batches(bs)) == list(orig.batches(bs))
    # ...and the epochs after it, too.
    orig.set_epoch(epoch + 1)
    restored.set_epoch(epoch + 1)
    assert _epoch(orig) == _epoch(restored)


def test_resume_with_a_prefetching_consumer() -> None:
    """The loop draws ahead (like a DataLoader) but records only what it used."""
    s = SealedSampler(100, seed=9, shuffle="chunk", chunk_records=8)
    straight = list(s.batches(10))
    it = s.batches(10)
    used = []
    prefetched = [next(it), next(it), next(it)]  # three drawn ahead
    for b in prefetched[:2]:
        used.append(b)
        s.advance(len(b))
    # crash here: the third batch was drawn but never used
    r = SealedSampler(100, seed=0, shuffle="chunk", chunk_records=8)
    r.load_state_dict(s.state_dict())
    assert used + list(r.batches(10)) == straight


def test_batches_drop_last() -> None:
    s = SealedSampler(23, shuffle=False)
    assert [len(b) for b in s.batches(5)] == [5, 5, 5, 5, 3]
    assert [len(b) for b in s.batches(5, drop_last=True)] == [5, 5, 5, 5]
    s.advance(4)
    assert [b[0] for b in s.batches(5)] == [4, 9, 14, 19]
    with pytest.raises(ConfigError):
        list(s.batches(0))


def test_chunk_mode_keeps_batches_local() -> None:
    n, r, w, b = 10_000, 50, 4, 128
    s = SealedSampler(n, seed=0, shuffle="chunk", chunk_records=r, window_chunks=w)
    touched = [len({i // r for i in batch}) for batch in s.batches(b)]
    assert max(touched) <= 2 * w  # a batch spans at most two windows
    full = SealedSampler(n, seed=0, shuffle="full", chunk_records=r)
    touched_full = [len({i // r for i in batch}) for batch in full.batches(b)]
    assert np.mean(touched_full) > 5 * np.mean(touched)


def test_chunk_mode_decrypts_each_chunk_once_per_epoch(shm_dir: Path, key: MasterKey) -> None:
    x = np.arange(3000, dtype=np.int32)
    seal_dataset(shm_dir / "d.pld", key, {"x": x}, chunk_records=20)
    with SealedDataset(shm_dir / "d.pld", key) as ds:
        s = SealedSampler(ds, seed=4)  # chunking taken from the dataset
        assert s.state_dict()["chunk_records"] == 20
        for e in range(2):
            s.set_epoch(e)
            before = ds.chunks_decrypted
            seen = []
            for idx in s.batches(64):
                (got,) = ds.get_batch(idx)
                assert got.tolist() == idx
                seen += idx
                s.advance(len(idx))
            assert sorted(seen) == list(range(3000))
            assert ds.chunks_decrypted - before == ds.num_chunks
        f = SealedSampler(ds, seed=4, shuffle="full")
        before = ds.chunks_decrypted
        for idx in f.batches(64):
            ds.get_batch(idx)
        assert ds.chunks_decrypted - before > 5 * ds.num_chunks  # the documented cost


def test_plain_datasets_and_lengths() -> None:
    s = SealedSampler(list(range(30)), seed=1)  # any sized dataset: chunks of one record
    assert s.state_dict()["chunk_records"] == 1
    assert sorted(s) == list(range(30))
    assert "records=30" in repr(s)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0,), {}),
        ((object(),), {}),
        ((10,), {"shuffle": True}),
        ((10,), {"shuffle": 0}),
        ((10,), {"shuffle": "random"}),
        ((10,), {"seed": -1}),
        ((10,), {"seed": 2**64}),
        ((10,), {"seed": 1.5}),
        ((10,), {"chunk_records": 0}),
        ((10,), {"window_chunks": 0}),
    ],
)
def test_bad_sampler_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SealedSampler(*args, **kwargs)


def test_bad_positions() -> None:
    s = SealedSampler(10)
    for bad in (-1, 1.0):
        with pytest.raises(ConfigError):
            s.advance(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            s.set_epoch(bad)  # type: ignore[arg-type]


def test_load_state_dict_refuses_other_configurations() -> None:
    s = SealedSampler(100, seed=1, shuffle="chunk", chunk_records=10)
    good = s.state_dict()
    for change in (
        {"shuffle": "full"},
        {"shuffle": False},
        {"num_records": 99},
        {"chunk_records": 5},
        {"window_chunks": 2},
        {"version": 2},
        {"seed": -3},
        {"epoch": -1},
        {"epoch": "1"},
        {"consumed": 101},
        {"consumed": None},
    ):
        with pytest.raises(StateMismatchError):
            SealedSampler(100, shuffle="chunk", chunk_records=10).load_state_dict(
                {**good, **change}
            )
    with pytest.raises(StateMismatchError):
        s.load_state_dict([])  # type: ignore[arg-type]
    s.load_state_dict(good)
