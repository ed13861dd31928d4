"""A mirror that keeps its previous generation: what a process of a multi-process job needs.

Its job may have to go back one step (the newest step every process holds), so
the previous generation stays readable until the next save starts; going back
is one commit-word store. Checked in the crash simulator at every persist
boundary, and as an attacker would act on the previous generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from plinius import mirror as mirror_mod
from plinius.counters import FileCounter
from plinius.crypto import MasterKey
from plinius.errors import ConfigError, IntegrityError, StateMismatchError
from plinius.mirror import Mirror, _format
from plinius.testing import CrashSimRegion


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(300, generator=g), "b": torch.randn(7, generator=g), "n": step}


def _blank() -> dict[str, Any]:
    return {"w": torch.zeros(300), "b": torch.zeros(7), "n": -1}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"]) and a["n"] == b["n"])


def _held(region: CrashSimRegion | bytes, key: MasterKey) -> list[int | None]:
    r = CrashSimRegion.from_image(region) if isinstance(region, bytes) else region
    with Mirror(r, key, readonly=True) as m:
        return m.held_steps()


def test_the_previous_step_is_held_until_the_next_save(key: MasterKey) -> None:
    region = CrashSimRegion(0)
    with Mirror(region, key, keep_previous=True) as m:
        assert m.held_steps() == [None]
        m.save(_state(1), step=1)
        assert m.held_steps() == [1, None]  # generation 0 holds nothing to go back to
        m.save(_state(2), step=2)
        assert m.held_steps() == [2, 1]
        m.save(_state(3), step=3)
        assert m.held_steps() == [3, 2]


def test_going_back_to_nothing_saved(key: MasterKey) -> None:
    with Mirror(CrashSimRegion(0), key, keep_previous=True) as m:
        m.save(_state(1), step=1)
        assert m.go_back() is None
        assert m.held_steps() == [None]
        assert m.restore(_blank()) is None
        with pytest.raises(StateMismatchError, match="no previous step"):
            m.go_back()


def test_a_plain_mirror_holds_only_the_committed_step(key: MasterKey) -> None:
    with Mirror(CrashSimRegion(0), key) as m:
        m.save(_state(1), step=1)
        m.save(_state(2), step=2)
        assert m.held_steps() == [2]
        with pytest.raises(StateMismatchError, match="holds step 2, not step 1"):
            m.restore(_blank(), step=1)


def test_going_back_restores_the_previous_step_and_makes_it_committed(key: MasterKey) -> None:
    region = CrashSimRegion(0)
    with Mirror(region, key, keep_previous=True) as m:
        for step in (1, 2, 3):
            m.save(_state(step), step=step)
        got = _blank()
        assert m.restore(got, step=2) == 2
        assert _same(got, _state(2))
        # Step 3 is dropped: it is neither committed nor previous any more.
        assert m.held_steps() == [2]
        with pytest.raises(StateMismatchError, match="holds step 2, not step 3"):
            m.restore(_blank(), step=3)
        # The job goes on from step 2: step 3 again, then 4.
        m.save(_state(3), step=3)
        assert m.held_steps() == [3, 2]
    # What is on the region is what the commit word says.
    assert _held(region.persisted_image(), key) == [3, 2]


def test_a_reader_goes_back_without_writing(key: MasterKey) -> None:
    region = CrashSimRegion(0)
    with Mirror(region, key, keep_previous=True) as m:
        for step in (1, 2):
            m.save(_state(step), step=step)
    before = region.image()
    with Mirror(CrashSimRegion.from_image(before), key, readonly=True) as r:
        got = _blank()
        assert r.restore(got, step=1) == 1
        assert _same(got, _state(1))
        assert r.read_tensors("w", step=1)["w"].equal(_state(1)["w"])
        assert r.held_steps() == [2, 1]


def test_the_current_step_is_restored_as_always(key: MasterKey) -> None:
    with Mirror(CrashSimRegion(0), key, keep_previous=True) as m:
        m.save(_state(1), step=1)
        m.save(_state(2), step=2)
        got = _blank()
        assert m.restore(got, step=2) == 2
        assert _same(got, _state(2))
        assert m.held_steps() == [2, 1]


def test_a_counter_is_refused(key: MasterKey, tmp_path: Path) -> None:
    # A member's counter is the set's (plinius.dist, SetFreshness), never its own.
    with pytest.raises(ConfigError, match="give the counter to the mirror set"):
        Mirror(CrashSimRegion(0), key, keep_previous=True, counter=FileCounter(tmp_path / "c"))


def test_every_crash_during_a_save_leaves_the_agreed_step_held(
    key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A save starts only once every process committed the current step, so a
    # crash anywhere in it must leave that step held: committed, or previous.
    monkeypatch.setattr(mirror_mod, "CHUNK_BYTES", 512)
    region = CrashSimRegion(0)
    m = Mirror(region, key, keep_previous=True)
    m.save(_state(1), step=1)
    m.save(_state(2), step=2)
    images: list[bytes] = []

    def collect(r: CrashSimRegion) -> None:
        images.extend(r.crash_images(exhaustive_limit=8, samples=16, seed=len(images)))

    region.on_persist = collect
    m.save(_state(3), step=3)
    region.on_persist = None
    m.close()
    assert len(images) >= 10
    seen = set()
    for img in images:
        held = _held(img, key)
        assert held in ([2, 1], [2], [3, 2]), held
        seen.add(tuple(held))
        with Mirror(CrashSimRegion.from_image(img), key, keep_previous=True) as again:
            got = _blank()
            assert again.restore(got, step=2) == 2
            assert _same(got, _state(2))
    assert seen >= {(2, 1), (2,), (3, 2)}


def test_every_crash_while_going_back_leaves_one_step_committed(key: MasterKey) -> None:
    region = CrashSimRegion(0)
    m = Mirror(region, key, keep_previous=True)
    for step in (1, 2, 3):
        m.save(_state(step), step=step)
    images: list[bytes] = []

    def collect(r: CrashSimRegion) -> None:
        images.extend(r.crash_images(exhaustive_limit=8, samples=16, seed=len(images)))

    region.on_persist = collect
    m.restore(_blank(), step=2)
    region.on_persist = None
    m.close()
    assert images
    for img in images:
        held = _held(img, key)
        # Before the commit word: as before. After it: step 2 alone, never step 3 again.
        assert held in ([3, 2], [2]), held
        with Mirror(CrashSimRegion.from_image(img), key, keep_previous=True) as again:
            got = _blank()
            assert again.restore(got, step=2) == 2
            assert _same(got, _state(2))


def _two_saves(key: MasterKey) -> tuple[bytes, _format.Manifest]:
    region = CrashSimRegion(0)
    with Mirror(region, key, keep_previous=True) as m:
        m.save(_state(1), step=1)
        m.save(_state(2), step=2)
        prev = m._previous()  # the layout, to aim at the previous generation's bytes
        assert prev is not None
    return region.image(), prev


def test_a_flipped_previous_root_means_not_held(key: MasterKey) -> None:
    img, prev = _two_saves(key)
    data = bytearray(img)
    data[_format.ROOT_OFFSETS[prev.slot] + 40] ^= 1
    assert _held(bytes(data), key) == [2]
    with (
        Mirror(CrashSimRegion.from_image(bytes(data)), key, keep_previous=True) as m,
        pytest.raises(StateMismatchError, match="holds step 2, not step 1"),
    ):
        m.restore(_blank(), step=1)


def test_a_flipped_previous_tensor_is_refused_when_going_back(key: MasterKey) -> None:
    img, prev = _two_saves(key)
    data = bytearray(img)
    e = next(e for e in prev.entries if e.nbytes == 300 * 4)
    data[e.slots[e.cur] + 10] ^= 0x80
    region = CrashSimRegion.from_image(bytes(data))
    with Mirror(region, key, keep_previous=True) as m:
        got = _blank()
        with pytest.raises(IntegrityError):
            m.restore(got, step=1)
        # Nothing was committed: the job still holds step 2, which is intact.
        assert m.held_steps() == [2, 1]
        assert m.restore(got, step=2) == 2
        assert _same(got, _state(2))


def test_the_previous_root_put_in_the_committed_slot_is_refused(key: MasterKey) -> None:
    # Splicing the previous root over the committed one (same salt and tags)
    # must not make step 1 read as committed: the AAD binds slot and generation.
    img, prev = _two_saves(key)
    data = bytearray(img)
    src = _format.ROOT_OFFSETS[prev.slot]
    dst = _format.ROOT_OFFSETS[1 - prev.slot]
    data[dst : dst + _format.ROOT_SIZE] = img[src : src + _format.ROOT_SIZE]
    with pytest.raises(IntegrityError):
        Mirror(CrashSimRegion.from_image(bytes(data)), key, readonly=True)
