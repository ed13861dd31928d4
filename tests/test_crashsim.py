"""The crash simulator: which cache lines a crash may lose, and the images it yields."""

from __future__ import annotations

import itertools

import pytest

from plinius.errors import StorageError
from plinius.pmem import CACHE_LINE, RegionLike
from plinius.testing import CrashSimRegion


def test_is_region_like_and_starts_clean() -> None:
    r = CrashSimRegion(1000)
    region: RegionLike = r  # the same interface as Region (checked by mypy)
    assert region.size == 1000 and not region.readonly and not region.is_pmem
    assert r.dirty_lines() == [] and r.image() == bytes(1000) == r.persisted_image()
    assert list(r.crash_images()) == [bytes(1000)]
    assert r.path is None and "dirty_lines=0" in repr(r)


def test_from_image_is_fully_persisted() -> None:
    img = bytes(range(200))
    r = CrashSimRegion.from_image(img)
    assert r.image() == img == r.persisted_image() and r.dirty_lines() == []


def test_writes_dirty_whole_lines() -> None:
    r = CrashSimRegion(4 * CACHE_LINE)
    r.buf[0] = 1  # line 0
    r.buf[CACHE_LINE - 1 : CACHE_LINE + 1] = b"\x02\x03"  # straddles lines 0 and 1
    r.buf[3 * CACHE_LINE + 10] = 4  # line 3
    assert r.dirty_lines() == [0, 1, 3]
    assert r.persisted_image() == bytes(4 * CACHE_LINE)
    # Writing the value a byte already had dirties nothing: lines are compared.
    r.buf[2 * CACHE_LINE] = 0
    assert r.dirty_lines() == [0, 1, 3]


def test_partial_last_line_is_tracked_and_persisted() -> None:
    size = 2 * CACHE_LINE + 10
    r = CrashSimRegion(size)
    r.buf[size - 1] = 7  # in the partial line 2
    assert r.dirty_lines() == [2]
    assert sorted(r.crash_images()) == sorted([bytes(size), r.image()])
    r.persist(size - 1, 1)
    assert r.dirty_lines() == [] and r.persisted_image() == r.image()
    # A persist of the last full byte range of the region is accepted, beyond is not.
    r.persist(0, size)
    with pytest.raises(ValueError, match="outside"):
        r.persist(size - 1, 2)


def test_persist_marks_the_covering_lines_only() -> None:
    r = CrashSimRegion(4 * CACHE_LINE)
    for i in range(4):
        r.buf[i * CACHE_LINE + 5] = i + 1
    r.persist(CACHE_LINE + 63, 2)  # touches lines 1 and 2, one byte each
    assert r.dirty_lines() == [0, 3]
    # The whole line is persisted, not just the bytes named: lines are flushed whole.
    assert r.persisted_image()[CACHE_LINE + 5] == 2
    assert r.persisted_image()[2 * CACHE_LINE + 5] == 3
    r.persist(0, 0)  # an empty range persists nothing
    assert r.dirty_lines() == [0, 3]


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, -1), (0, 257), (256, 1)])
def test_persist_range_checks(offset: int, length: int) -> None:
    r = CrashSimRegion(256)
    with pytest.raises(ValueError):
        r.persist(offset, length)
    assert r.persist_calls == 0


@pytest.mark.parametrize("n_dirty", [0, 1, 2, 3, 5, 8])
def test_exhaustive_crash_images(n_dirty: int) -> None:
    r = CrashSimRegion(16 * CACHE_LINE)
    lines = [1, 2, 4, 7, 8, 11, 13, 15][:n_dirty]
    for line in lines:
        r.buf[line * CACHE_LINE : (line + 1) * CACHE_LINE] = bytes([line + 1]) * CACHE_LINE
    assert r.dirty_lines() == lines
    images = list(r.crash_images())
    assert len(images) == 2**n_dirty
    assert len(set(images)) == 2**n_dirty  # every subset, each once
    expected = set()
    for k in range(n_dirty + 1):
        for kept in itertools.combinations(lines, k):
            img = bytearray(16 * CACHE_LINE)
            for line in kept:
                img[line * CACHE_LINE : (line + 1) * CACHE_LINE] = r.buf[
                    line * CACHE_LINE : (line + 1) * CACHE_LINE
                ]
            expected.add(bytes(img))
    assert set(images) == expected


def test_crash_images_keep_persisted_lines() -> None:
    r = CrashSimRegion(4 * CACHE_LINE)
    r.buf[0:4] = b"keep"
    r.persist(0, 4)
    r.buf[CACHE_LINE : CACHE_LINE + 4] = b"lose"
    r.buf[0:4] = b"KEEP"  # line 0 is dirty again, with new contents over persisted ones
    images = set(r.crash_images())
    assert len(images) == 4
    # Line 0 is either its persisted contents or its latest ones, never zeros.
    assert {img[:4] for img in images} == {b"keep", b"KEEP"}
    assert {img[CACHE_LINE : CACHE_LINE + 4] for img in images} == {bytes(4), b"lose"}


def test_crash_image_with_explicit_kept_lines() -> None:
    r = CrashSimRegion(3 * CACHE_LINE)
    r.buf[:] = b"\x01" * (3 * CACHE_LINE)
    img = r.crash_image(frozenset({1}))
    assert img == bytes(CACHE_LINE) + b"\x01" * CACHE_LINE + bytes(CACHE_LINE)
    assert r.crash_image(set()) == r.persisted_image()
    assert r.crash_image({0, 1, 2}) == r.image()


def test_sampling_many_lines_is_deterministic_per_seed() -> None:
    n = 40
    r = CrashSimRegion(n * CACHE_LINE)
    for line in range(n):
        r.buf[line * CACHE_LINE] = 1
    assert len(r.dirty_lines()) == n
    a = list(r.crash_images(samples=20, seed=3))
    b = list(r.crash_images(samples=20, seed=3))
    c = list(r.crash_images(samples=20, seed=4))
    assert len(a) == 22 and a == b and a != c
    # All lost and all kept always come first, then random subsets.
    assert a[0] == r.persisted_image() and a[1] == r.image()
    kept_counts = {sum(img[line * CACHE_LINE] for line in range(n)) for img in a[2:]}
    assert len(kept_counts) > 3  # subsets of varied sizes, not one fixed pattern
    # Every sample is a valid crash image: each line either lost or kept, whole.
    for img in a:
        for line in range(n):
            chunk = img[line * CACHE_LINE : (line + 1) * CACHE_LINE]
            assert chunk in (bytes(CACHE_LINE), b"\x01" + bytes(CACHE_LINE - 1))


def test_exhaustive_limit_switches_to_sampling() -> None:
    r = CrashSimRegion(8 * CACHE_LINE)
    for line in range(5):
        r.buf[line * CACHE_LINE] = 9
    assert len(list(r.crash_images(exhaustive_limit=5))) == 32
    assert len(list(r.crash_images(exhaustive_limit=4, samples=7))) == 9


def test_on_persist_hook_sees_the_state_before_each_persist() -> None:
    r = CrashSimRegion(4 * CACHE_LINE)
    seen: list[tuple[int, list[int], int]] = []
    r.on_persist = lambda reg: seen.append(
        (reg.persist_calls, reg.dirty_lines(), len(list(reg.crash_images())))
    )
    r.buf[0] = 1
    r.persist(0, 1)
    r.buf[CACHE_LINE] = 2
    r.buf[2 * CACHE_LINE] = 3
    r.persist(CACHE_LINE, CACHE_LINE + 1)
    r.persist(0, 0)
    # Called before each persist takes effect, in order, for empty ranges too.
    assert seen == [(0, [0], 2), (1, [1, 2], 4), (2, [], 1)]
    assert r.persist_calls == 3


def test_grow_zero_fills_and_keeps_both_images() -> None:
    r = CrashSimRegion(CACHE_LINE + 8)
    r.buf[0] = 1
    r.persist(0, 1)
    r.buf[CACHE_LINE + 1] = 2  # dirty, in the partial last line
    r.grow(3 * CACHE_LINE)
    assert r.size == 3 * CACHE_LINE and len(r.buf) == 3 * CACHE_LINE
    assert r.image()[0] == 1 and r.image()[CACHE_LINE + 1] == 2
    assert r.image()[CACHE_LINE + 8 :] == bytes(2 * CACHE_LINE - 8)
    assert r.persisted_image()[0] == 1 and r.persisted_image()[CACHE_LINE + 1] == 0
    assert r.dirty_lines() == [1]  # still dirty after growing
    r.buf[2 * CACHE_LINE] = 5  # the new range is writable through the new view
    assert r.dirty_lines() == [1, 2]
    r.grow(CACHE_LINE)  # shrinking is a no-op
    assert r.size == 3 * CACHE_LINE


def test_close_drops_the_view_but_keeps_images() -> None:
    r = CrashSimRegion(100)
    r.buf[0] = 1
    r.close()
    with pytest.raises(StorageError, match="closed"):
        _ = r.buf
    assert r.image()[0] == 1 and r.dirty_lines() == [0]
