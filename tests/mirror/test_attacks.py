"""The attacker's suite: what a host that reads and writes the mirror file can and cannot do."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from plinius.crypto import MasterKey
from plinius.errors import FormatError, IntegrityError, PliniusError, WrongKeyError
from plinius.mirror import Mirror
from plinius.mirror import _format as fmt

SECRET = "do-not-leak-this-hyperparameter-string"


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(256, generator=g),
        "b": torch.randn(64, generator=g),  # same size as c: swappable
        "c": torch.randn(64, generator=g),
        "note": SECRET,
    }


def _zeros() -> dict[str, Any]:
    return {"a": torch.zeros(256), "b": torch.zeros(64), "c": torch.zeros(64), "note": None}


@pytest.fixture
def mirror_file(shm_dir: Path, key: MasterKey) -> tuple[Path, dict[str, Any], Any]:
    """A mirror with three committed generations; returns (path, last state, manifest)."""
    path = shm_dir / "victim.plm"
    with Mirror(path, key) as m:
        for step in (1, 2, 3):
            st = _state(step)
            m.save(st, step=step)
        manifest = m._manifest
    return path, st, manifest


def _restore(path: Path, key: MasterKey) -> dict[str, Any]:
    target = _zeros()
    with Mirror(path, key) as m:
        m.restore(target)
    return target


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _refused(path: Path, key: MasterKey, exc: type[PliniusError] = IntegrityError) -> None:
    with pytest.raises(exc):
        _restore(path, key)


def test_wrong_key_is_named_before_any_decryption(
    mirror_file: Any, other_key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, _ = mirror_file
    from plinius import crypto

    def no_decrypt(*a: Any) -> None:
        raise AssertionError("decrypted with the wrong key")

    monkeypatch.setattr(crypto.Aead, "decrypt", no_decrypt)
    monkeypatch.setattr(crypto.Aead, "decrypt_into", no_decrypt)
    with pytest.raises(WrongKeyError, match="another master key"):
        Mirror(path, other_key, readonly=True)


def _regions(manifest: Any) -> dict[str, list[int]]:
    """Byte offsets in each part of the file that the committed generation depends on."""
    r = manifest.root
    root_off = fmt.ROOT_OFFSETS[manifest.slot]
    out = {
        "superblock": list(range(12, fmt.HEADER_LEN)),
        "header padding": [fmt.HEADER_LEN, 200, fmt.COMMIT_OFFSET + 8, 4000],
        "commit word": list(range(fmt.COMMIT_OFFSET, fmt.COMMIT_OFFSET + 8)),
        "root": list(range(root_off, root_off + 20 + fmt.ROOT_PLAIN_SIZE + 16)),
        "body": sorted(random.Random(0).sample(range(r.body_off, r.body_off + r.body_len), 40)),
    }
    tensors = []
    for e in manifest.entries:
        end = e.offset + e.nbytes + 16
        tensors += [e.offset, e.offset + e.nbytes // 2, end - 17, end - 16, end - 1]
    out["tensors"] = tensors
    return out


@pytest.mark.parametrize(
    "part", ["superblock", "header padding", "commit word", "root", "body", "tensors"]
)
def test_any_flipped_byte_the_committed_state_depends_on_is_caught(
    mirror_file: Any, key: MasterKey, part: str
) -> None:
    path, _, manifest = mirror_file
    pristine = path.read_bytes()
    for off in _regions(manifest)[part]:
        for bit in (0, 7):
            path.write_bytes(pristine)
            _flip(path, off, bit)
            _refused(path, key)


def test_flipped_magic_or_version_is_a_format_error(mirror_file: Any, key: MasterKey) -> None:
    path, _, _ = mirror_file
    pristine = path.read_bytes()
    for off in range(12):
        path.write_bytes(pristine)
        _flip(path, off)
        _refused(path, key, FormatError)


def test_bytes_nothing_refers_to_may_change_without_harm(mirror_file: Any, key: MasterKey) -> None:
    path, st, manifest = mirror_file
    data = bytearray(path.read_bytes())
    # the superseded root slot, the other slot of each tensor pair, the other body slot
    old_root = fmt.ROOT_OFFSETS[1 - manifest.slot]
    data[old_root : old_root + 200] = bytes(random.Random(1).randbytes(200))
    for e in manifest.entries:
        other = e.slots[1 - e.cur]
        data[other : other + e.nbytes] = bytes(e.nbytes)
    data[manifest.root.body_other : manifest.root.body_other + 100] = b"\xff" * 100
    path.write_bytes(bytes(data))
    out = _restore(path, key)
    assert all(torch.equal(out[k], st[k]) for k in "abc") and out["note"] == SECRET


def test_swapped_manifest_slots_are_caught(mirror_file: Any, key: MasterKey) -> None:
    path, _, _ = mirror_file
    data = bytearray(path.read_bytes())
    a, b = fmt.ROOT_OFFSETS
    data[a : a + fmt.ROOT_SIZE], data[b : b + fmt.ROOT_SIZE] = (
        data[b : b + fmt.ROOT_SIZE],
        data[a : a + fmt.ROOT_SIZE],
    )
    path.write_bytes(bytes(data))
    _refused(path, key)


def test_swapped_tensors_are_caught_before_anything_is_written(
    mirror_file: Any, key: MasterKey
) -> None:
    path, _, manifest = mirror_file
    eb, ec = manifest.entries[1], manifest.entries[2]  # "b" and "c", the same size
    n = eb.nbytes + 16
    data = bytearray(path.read_bytes())
    data[eb.offset : eb.offset + n], data[ec.offset : ec.offset + n] = (
        data[ec.offset : ec.offset + n], data[eb.offset : eb.offset + n],
    )  # fmt: skip
    path.write_bytes(bytes(data))
    target = _zeros()
    target["a"].fill_(7.0)
    with Mirror(path, key) as m, pytest.raises(IntegrityError, match="replaced or damaged"):
        m.restore(target)
    assert torch.all(target["a"] == 7.0)  # caught by the tag check: nothing written


def test_a_tensor_slot_swapped_with_its_older_copy_is_caught(
    mirror_file: Any, key: MasterKey
) -> None:
    path, _, manifest = mirror_file
    e = manifest.entries[0]
    n = e.nbytes + 16
    a, b = e.slots
    data = bytearray(path.read_bytes())
    data[a : a + n], data[b : b + n] = data[b : b + n], data[a : a + n]
    path.write_bytes(bytes(data))
    _refused(path, key)


def test_ciphertext_damage_found_part_way_zeroes_what_was_written(
    mirror_file: Any, key: MasterKey
) -> None:
    path, _, manifest = mirror_file
    last = manifest.entries[2]
    _flip(path, last.offset + 3)  # the ciphertext, not the tag: found only by decrypting
    target = _zeros()
    with Mirror(path, key, threads=1) as m, pytest.raises(IntegrityError, match="must not be used"):
        m.restore(target)
    assert all(not target[k].any() for k in "abc") and target["note"] is None


def test_an_old_manifest_copied_over_is_caught(
    mirror_file: Any, key: MasterKey, shm_dir: Path
) -> None:
    path, _, _ = mirror_file
    old = shm_dir / "old.plm"
    shutil.copy(path, old)
    with Mirror(path, key) as m:
        m.save(_state(4), step=4)
        m.save(_state(5), step=5)
        root_slot = m._manifest.slot
    # generation 3 lives in the same root slot as generation 5: replay it
    data = bytearray(path.read_bytes())
    old_data = old.read_bytes()
    off = fmt.ROOT_OFFSETS[root_slot]
    data[off : off + fmt.ROOT_SIZE] = old_data[off : off + fmt.ROOT_SIZE]
    path.write_bytes(bytes(data))
    _refused(path, key)
    # and with the old commit word too: generation 3's tensors were overwritten since
    data[fmt.COMMIT_OFFSET : fmt.COMMIT_OFFSET + 8] = old_data[
        fmt.COMMIT_OFFSET : fmt.COMMIT_OFFSET + 8
    ]
    path.write_bytes(bytes(data))
    _refused(path, key)


def test_a_commit_word_rewound_to_the_previous_generation_is_caught(
    mirror_file: Any, key: MasterKey
) -> None:
    path, _, manifest = mirror_file
    gen, slot = manifest.root.generation, manifest.slot
    data = bytearray(path.read_bytes())
    word = fmt.pack_commit(gen - 1, 1 - slot)  # a valid check: the attacker knows the CRC
    data[fmt.COMMIT_OFFSET : fmt.COMMIT_OFFSET + 8] = word.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    _refused(path, key)  # the superseded root was wiped after the commit


@pytest.mark.parametrize("keep", [0, 5, 100, fmt.DATA_START - 1, fmt.DATA_START + 10, -1])
def test_truncated_files_are_caught(mirror_file: Any, key: MasterKey, keep: int) -> None:
    path, _, _ = mirror_file
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1000])
    with pytest.raises((IntegrityError, FormatError)) as ei:
        _restore(path, key)
    if keep == 0 or keep >= 8:
        assert isinstance(ei.value, IntegrityError)


def test_zero_length_and_garbage_files(shm_dir: Path, key: MasterKey) -> None:
    empty = shm_dir / "empty.plm"
    empty.write_bytes(b"")
    with pytest.raises(IntegrityError, match="empty"):
        Mirror(empty, key)
    assert empty.read_bytes() == b""  # never silently turned into a new mirror
    garbage = shm_dir / "garbage.plm"
    garbage.write_bytes(random.Random(2).randbytes(100_000))
    with pytest.raises(FormatError, match="not a plinius mirror"):
        Mirror(garbage, key)
    ds = shm_dir / "data.pld"
    ds.write_bytes(b"PLINIUSD" + bytes(100))
    with pytest.raises(FormatError, match="sealed dataset"):
        Mirror(ds, key)
    magic_only = shm_dir / "magic.plm"
    magic_only.write_bytes(fmt.MAGIC + random.Random(3).randbytes(fmt.DATA_START * 2))
    with pytest.raises((IntegrityError, FormatError)):
        Mirror(magic_only, key)


def test_random_damage_never_passes_silently(mirror_file: Any, key: MasterKey) -> None:
    """Random multi-byte damage anywhere: either refused, or the exact committed state."""
    path, st, _ = mirror_file
    pristine = path.read_bytes()
    rng = random.Random(5)
    for _ in range(60):
        data = bytearray(pristine)
        for _ in range(rng.randint(1, 4)):
            off = rng.randrange(len(data))
            data[off] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            out = _restore(path, key)
        except PliniusError:
            continue
        assert all(torch.equal(out[k], st[k]) for k in "abc") and out["note"] == SECRET


def test_the_file_holds_no_plaintext(mirror_file: Any) -> None:
    path, st, _ = mirror_file
    data = path.read_bytes()
    for k in "abc":
        raw = st[k].numpy().tobytes()
        for i in range(0, len(raw) - 16, 16):
            assert raw[i : i + 16] not in data
    assert SECRET.encode() not in data and b'"note"' not in data and b"model" not in data
    # the plaintext is high-entropy, and so is everything written: no long zero or text runs
    # outside the header and slack
    arr = np.frombuffer(data, dtype=np.uint8)
    assert arr.size > 0
