"""Keys and AES-256-GCM: known answers, round trips, and tampering as an attacker would."""

from __future__ import annotations

import copy
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plinius._fsutil import create_secret_file
from plinius.crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    Aead,
    MasterKey,
    aad,
    counter_nonce,
    hkdf,
    iter_chunks,
)
from plinius.errors import IntegrityError, KeyFileError, PliniusError, StorageError

h = bytes.fromhex

# --- known answers ---------------------------------------------------------

# AES-256-GCM: test cases 13-16 of D. McGrew and J. Viega, "The Galois/Counter
# Mode of Operation (GCM)", revised spec (2005), appendix B (the 256-bit key
# cases, 96-bit IV), the same vectors NIST's GCM page links to. Typed in from
# the spec as reproduced in public test suites (e.g. BouncyCastle's AESTest and
# several KAT tables). Fields: key, iv, plaintext, aad, ciphertext, tag.
_GCM_P = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
_GCM_C = (
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad"
)
_GCM_K = "feffe9928665731c6d6a8f9467308308" * 2
GCM_VECTORS = [
    pytest.param("00" * 32, "00" * 12, "", "", "", "530f8afbc74536b9a963b4f1c4cb738b", id="tc13"),
    pytest.param(
        "00" * 32,
        "00" * 12,
        "00" * 16,
        "",
        "cea7403d4d606b6e074ec5d3baf39d18",
        "d0d1c8a799996bf0265b98b5d48ab919",
        id="tc14",
    ),
    pytest.param(
        _GCM_K,
        "cafebabefacedbaddecaf888",
        _GCM_P,
        "",
        _GCM_C,
        "b094dac5d93471bdec1a502270e3cc6c",
        id="tc15-no-aad",
    ),
    pytest.param(
        _GCM_K,
        "cafebabefacedbaddecaf888",
        _GCM_P[:120],  # 60 bytes
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        _GCM_C[:120],
        "76fc6ece0f4e1768cddf8853bb2d551b",
        id="tc16-with-aad",
    ),
]


@pytest.mark.parametrize(("key", "iv", "pt", "ad", "ct", "tag"), GCM_VECTORS)
def test_aes_gcm_known_answers(key: str, iv: str, pt: str, ad: str, ct: str, tag: str) -> None:
    aead = Aead(h(key))
    # encrypt_into a slice of a larger buffer: the bytes around it stay untouched.
    out = bytearray(b"\xee" * (len(pt) // 2 + TAG_SIZE + 8))
    view = memoryview(out)[4:-4]
    aead.encrypt_into(h(iv), h(pt), h(ad), view)
    assert bytes(view) == h(ct + tag)
    assert out[:4] == out[-4:] == b"\xee" * 4
    assert aead.encrypt(h(iv), h(pt), h(ad)) == h(ct + tag)

    back = bytearray(len(pt) // 2)
    aead.decrypt_into(h(iv), h(ct + tag), h(ad), back)
    assert bytes(back) == h(pt)
    assert aead.decrypt(h(iv), h(ct + tag), h(ad)) == h(pt)


# HKDF-SHA256: RFC 5869, appendix A, test cases 1-3 (A.1-A.3), typed in from the
# RFC. Fields: ikm, salt, info, length, okm.
HKDF_VECTORS = [
    pytest.param(
        "0b" * 22,
        "000102030405060708090a0b0c",
        "f0f1f2f3f4f5f6f7f8f9",
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        id="rfc5869-A.1",
    ),
    pytest.param(
        bytes(range(0x00, 0x50)).hex(),
        bytes(range(0x60, 0xB0)).hex(),
        bytes(range(0xB0, 0x100)).hex(),
        82,
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
        id="rfc5869-A.2",
    ),
    pytest.param(
        "0b" * 22,
        "",
        "",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        id="rfc5869-A.3",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), HKDF_VECTORS)
def test_hkdf_known_answers(ikm: str, salt: str, info: str, length: int, okm: str) -> None:
    assert hkdf(h(ikm), salt=h(salt), info=h(info), length=length) == h(okm)


def test_hkdf_absent_salt_is_zero_salt_and_str_info_is_utf8() -> None:
    ikm = b"\x0b" * 22
    expected = h(HKDF_VECTORS[2].values[4])  # type: ignore[arg-type]
    # RFC 5869 2.2: a salt that is not provided is HashLen zero bytes.
    assert hkdf(ikm, salt=None, info="", length=42) == expected
    assert hkdf(ikm, salt=bytes(32), info=b"", length=42) == expected
    assert hkdf(ikm, salt=None, info="mirror") == hkdf(ikm, salt=None, info=b"mirror")
    assert hkdf(ikm, salt=None, info="é") == hkdf(ikm, salt=None, info="é".encode())


# --- round trips and tampering --------------------------------------------


def test_round_trip_zero_copy_between_memoryview_slices() -> None:
    aead = Aead(os.urandom(KEY_SIZE))
    src_arr = np.arange(1000, dtype=np.float32)
    region = bytearray(8192)
    view = memoryview(region)
    nonce = counter_nonce(7)
    ad = aad("w", 3)
    n = src_arr.nbytes
    aead.encrypt_into(nonce, memoryview(src_arr).cast("B"), ad, view[100 : 100 + n + TAG_SIZE])
    assert bytes(view[100 : 100 + n]) != src_arr.tobytes()  # really encrypted
    assert region[:100] == bytes(100) and region[100 + n + TAG_SIZE :] == bytes(8192 - 116 - n)

    dst_arr = np.zeros(1000, dtype=np.float32)
    aead.decrypt_into(nonce, view[100 : 100 + n + TAG_SIZE], ad, memoryview(dst_arr).cast("B"))
    assert np.array_equal(dst_arr, src_arr)


def test_empty_message_round_trip() -> None:
    aead = Aead(os.urandom(KEY_SIZE))
    out = bytearray(TAG_SIZE)
    aead.encrypt_into(counter_nonce(0), b"", b"hdr", out)
    aead.decrypt_into(counter_nonce(0), out, b"hdr", bytearray(0))
    with pytest.raises(IntegrityError):
        aead.decrypt_into(counter_nonce(0), out, b"hdX", bytearray(0))


def _sealed() -> tuple[Aead, bytes, bytes, bytes]:
    aead = Aead(bytes(range(32)))
    nonce = counter_nonce(5, domain=2)
    ad = aad("layer1.weight", 9, (3, 4))
    msg = b"sixteen byte msg plus a bit"
    out = bytearray(len(msg) + TAG_SIZE)
    aead.encrypt_into(nonce, msg, ad, out)
    return aead, nonce, ad, bytes(out)


def _flips(data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data) * 8):
        b = bytearray(data)
        b[i // 8] ^= 1 << (i % 8)
        out.append(bytes(b))
    return out


def test_every_single_bit_flip_of_ciphertext_and_tag_is_detected() -> None:
    aead, nonce, ad, sealed = _sealed()
    dst = bytearray(len(sealed) - TAG_SIZE)
    aead.decrypt_into(nonce, sealed, ad, dst)  # the untouched one verifies
    flipped = _flips(sealed)
    assert len(flipped) == len(sealed) * 8
    for bad in flipped:
        with pytest.raises(IntegrityError):
            aead.decrypt_into(nonce, bad, ad, dst)
        with pytest.raises(IntegrityError):
            aead.decrypt(nonce, bad, ad)


def test_every_single_bit_flip_of_aad_and_nonce_is_detected() -> None:
    aead, nonce, ad, sealed = _sealed()
    dst = bytearray(len(sealed) - TAG_SIZE)
    for bad_ad in _flips(ad):
        with pytest.raises(IntegrityError):
            aead.decrypt_into(nonce, sealed, bad_ad, dst)
    for bad_nonce in _flips(nonce):
        with pytest.raises(IntegrityError):
            aead.decrypt_into(bad_nonce, sealed, ad, dst)


def test_truncated_or_extended_ciphertext_is_detected() -> None:
    aead, nonce, _, sealed = _sealed()
    for bad in (sealed[:-1], sealed[1:], sealed + b"\x00", sealed[:TAG_SIZE]):
        with pytest.raises(IntegrityError):
            aead.decrypt(nonce, bad, aad("layer1.weight", 9, (3, 4)))


def test_wrong_key_is_detected(key: MasterKey, other_key: MasterKey) -> None:
    salt = os.urandom(16)
    sealed = key.aead("mirror", salt).encrypt(counter_nonce(0), b"model bytes", b"")
    assert key.aead("mirror", salt).decrypt(counter_nonce(0), sealed, b"") == b"model bytes"
    for wrong in (
        other_key.aead("mirror", salt),
        key.aead("mirror", os.urandom(16)),
        key.aead("data", salt),
    ):
        with pytest.raises(IntegrityError):
            wrong.decrypt(counter_nonce(0), sealed, b"")


def test_integrity_error_is_a_plinius_error_and_chains_invalid_tag() -> None:
    aead, nonce, _, sealed = _sealed()
    with pytest.raises(IntegrityError) as info:
        aead.decrypt(nonce, sealed, b"other")
    assert isinstance(info.value, PliniusError)
    assert type(info.value.__cause__).__name__ == "InvalidTag"


def test_aead_rejects_wrong_key_size_and_hides_key() -> None:
    for n in (0, 16, 31, 33):
        with pytest.raises(ValueError, match="32-byte"):
            Aead(bytes(n))
    raw = bytes(range(32))
    a = Aead(raw)
    assert raw.hex() not in repr(a) and "key hidden" in repr(a)


# --- aad -------------------------------------------------------------------


def test_aad_is_unambiguous_on_classic_collisions() -> None:
    assert aad("ab", "c") != aad("a", "bc")
    assert aad(b"ab", b"c") != aad(b"a", b"bc")
    encodings = [aad(1), aad("1"), aad(b"1"), aad(True), aad((1,)), aad([1]), aad(None)]
    # A list and a tuple of the same ints are the same field (a shape); all else differs.
    assert aad((1,)) == aad([1])
    assert len(set(encodings)) == len(encodings) - 1
    assert aad(0) != aad(False) != aad(None)
    assert aad() == b""
    assert aad("", "") != aad("")
    assert aad((1, 2), 3) != aad((1,), 2, 3)
    assert aad(-1) != aad(2**128 - 1 - 2**127)
    assert aad(bytearray(b"x")) == aad(b"x") == aad(memoryview(b"x"))


def test_aad_refuses_ambiguous_or_unknown_fields() -> None:
    for bad in [(1.5,), ("1",), (b"1",), [None]]:
        with pytest.raises(TypeError):
            aad(bad)  # type: ignore[arg-type]
    for bad_field in (1.5, object(), {"a": 1}):
        with pytest.raises(TypeError):
            aad(bad_field)  # type: ignore[arg-type]


def test_aad_accepts_numpy_integers_as_their_values() -> None:
    assert aad(np.int64(5)) == aad(5)
    assert aad((np.int32(3), np.uint8(4))) == aad((3, 4))


_field = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**127), max_value=2**127 - 1),
    st.text(max_size=6),
    st.binary(max_size=6),
    st.tuples(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3).map(tuple),
)


def _canon(fields: tuple[object, ...]) -> tuple[object, ...]:
    # Values that are the same field by design: lists/tuples of ints (shapes).
    return tuple(
        ("shape", tuple(f)) if isinstance(f, list | tuple) else (type(f).__name__, f)
        for f in fields
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(_field, max_size=4).map(tuple), st.lists(_field, max_size=4).map(tuple))
def test_aad_distinct_fields_give_distinct_encodings(a: tuple, b: tuple) -> None:  # type: ignore[type-arg]
    if _canon(a) != _canon(b):
        assert aad(*a) != aad(*b)
    else:
        assert aad(*a) == aad(*b)


# --- nonces and chunks -------------------------------------------------------


def test_counter_nonce_layout_and_ranges() -> None:
    assert counter_nonce(0) == bytes(NONCE_SIZE)
    assert counter_nonce(1) == bytes(11) + b"\x01"
    assert counter_nonce(1, domain=1) == b"\x00\x00\x00\x01" + bytes(7) + b"\x01"
    assert counter_nonce(2**64 - 1, 2**32 - 1) == b"\xff" * 12
    assert len({counter_nonce(i, d) for i in range(50) for d in range(4)}) == 200
    for c, d in ((-1, 0), (2**64, 0), (0, -1), (0, 2**32)):
        with pytest.raises(ValueError):
            counter_nonce(c, d)


def test_iter_chunks_covers_exactly() -> None:
    assert list(iter_chunks(10, 4)) == [(0, 4), (4, 4), (8, 2)]
    assert list(iter_chunks(0, 4)) == []
    assert list(iter_chunks(8, 4)) == [(0, 4), (4, 4)]


# --- MasterKey ---------------------------------------------------------------


def test_generate_save_load_round_trip(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "owner.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == key.raw_bytes() and len(key.raw_bytes()) == KEY_SIZE
    loaded = MasterKey.load(path)
    assert loaded == key and hash(loaded) == hash(key)
    assert loaded.fingerprint == key.fingerprint


def test_save_mode_is_0600_whatever_the_umask(tmp_path: Path, key: MasterKey) -> None:
    old = os.umask(0)
    try:
        key.save(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_save_refuses_to_overwrite(tmp_path: Path, key: MasterKey, other_key: MasterKey) -> None:
    path = tmp_path / "owner.key"
    key.save(path)
    with pytest.raises(KeyFileError, match="already exists"):
        other_key.save(path)
    assert MasterKey.load(path) == key  # the first key is intact
    # A symlink in the way (even a dangling one) is refused too, not followed.
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(KeyFileError):
        key.save(link)
    assert not (tmp_path / "nowhere").exists()


def test_save_into_missing_directory_is_a_storage_error(tmp_path: Path, key: MasterKey) -> None:
    with pytest.raises(StorageError, match="directory exist"):
        key.save(tmp_path / "no" / "such" / "k")


def test_secret_files_share_one_writer(tmp_path: Path) -> None:
    """The master key, the key server identity and the simulation sealing key: 0600, fsynced,
    never overwritten, and a file someone else created is never removed."""
    from plinius.tee.platform import detect_platform
    from plinius.tee.protocol import load_identity
    from plinius.tee.sealing import seal_master_key

    old = os.umask(0)
    try:
        load_identity(tmp_path / "identity.pem")
        sim = detect_platform(tmp_path / "no-attestation", tmp_path / "no-tsm")
        seal_master_key(sim, tmp_path / "job.sealed", MasterKey.generate(), job_id="j")
    finally:
        os.umask(old)
    for name in ("identity.pem", "job.sealed.simkey"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    # Another process created the file first: refused, and its file left as it was.
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"their secret")
    with pytest.raises(StorageError, match="cannot create secret"):
        create_secret_file(theirs, b"mine", what="secret")
    assert theirs.read_bytes() == b"their secret"


def test_a_failed_secret_write_leaves_no_file(
    tmp_path: Path, key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match=r"cannot write key file .*free some space"):
        key.save(tmp_path / "k")
    assert not (tmp_path / "k").exists()


def test_load_missing_file_suggests_keygen(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeyFileError, match="plinius keygen"):
        MasterKey.load(path)


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
def test_load_refuses_wrong_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"holds {size} bytes"):
        MasterKey.load(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o666])
def test_load_refuses_group_or_other_access(tmp_path: Path, key: MasterKey, mode: int) -> None:
    path = tmp_path / "k"
    key.save(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600") as info:
        MasterKey.load(path)
    assert f"{mode:04o}" in str(info.value)


def test_load_accepts_0400(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "k"
    key.save(path)
    path.chmod(0o400)
    assert MasterKey.load(path) == key


def test_load_refuses_directory_and_fifo(tmp_path: Path) -> None:
    d = tmp_path / "dir.key"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        MasterKey.load(d)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        MasterKey.load(fifo)  # must not hang waiting for a writer


def test_master_key_constructor_checks_size() -> None:
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(KeyFileError):
            MasterKey(bad)
    assert MasterKey(bytearray(32)) == MasterKey(bytes(32))


def test_key_never_leaks_into_text(tmp_path: Path) -> None:
    raw = bytes(range(0x41, 0x41 + 32))  # printable, so a leak would show in text
    key = MasterKey(raw)
    texts = [repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})]
    path = tmp_path / "k"
    key.save(path)
    errors: list[BaseException] = []
    for action in (
        lambda: key.save(path),
        lambda: (path.chmod(0o644), MasterKey.load(path)),
        lambda: pickle.dumps(key),
        lambda: copy.deepcopy(key),
        lambda: key.derive("fingerprint", b""),
    ):
        try:
            action()
        except Exception as exc:
            errors.append(exc)
    assert len(errors) == 5
    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    for text in texts:
        for leak in (raw.hex(), raw.hex().upper(), raw.decode("ascii"), repr(raw)):
            assert leak not in text, text
    assert key.fingerprint.hex() in repr(key)


def test_pickling_and_copying_are_refused(key: MasterKey) -> None:
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(key, protocol=proto)
    with pytest.raises(TypeError):
        pickle.dumps({"nested": [key]})
    with pytest.raises(TypeError):
        copy.copy(key)
    assert not hasattr(key, "__dict__")


def test_fingerprint_is_stable_16_bytes_and_not_the_key() -> None:
    raw = bytes(range(32))
    a, b = MasterKey(raw), MasterKey(raw)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert a.fingerprint == hkdf(raw, salt=None, info="plinius/v1/fingerprint", length=16)
    assert a.fingerprint not in raw
    assert MasterKey(bytes(32)).fingerprint != a.fingerprint
    assert MasterKey.generate().fingerprint != MasterKey.generate().fingerprint


def test_derive_separates_domains(key: MasterKey) -> None:
    salt = b"s" * 16
    keys = {
        key.derive("mirror", salt),
        key.derive("data", salt),
        key.derive("data/image", salt),
        key.derive("data/label", salt),
        key.derive("wrap", salt),
        key.derive("mirror", b"t" * 16),
        key.derive("mirror", b""),
        key.fingerprint + bytes(16),
    }
    assert len(keys) == 8
    assert key.derive("mirror", salt) == key.derive("mirror", salt)
    assert len(key.derive("mirror", salt, length=64)) == 64
    assert key.derive("mirror", salt) == hkdf(key.raw_bytes(), salt=salt, info="plinius/v1/mirror")
    with pytest.raises(ValueError, match="reserved"):
        key.derive("fingerprint", salt)


def test_equality_is_by_value_only(key: MasterKey, other_key: MasterKey) -> None:
    assert key != other_key
    assert key != key.raw_bytes()
    assert MasterKey(key.raw_bytes()) == key
