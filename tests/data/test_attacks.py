"""The attacker's suite for sealed datasets.

The adversary owns the host: it reads and rewrites the dataset file at will,
keeps other datasets sealed under the same key, and hopes the trainer reads
something the data owner did not seal. Every attack must end in a
PliniusError (the exact class says which check caught it), never in data.
"""

from __future__ import annotations

import hmac
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from plinius.crypto import TAG_SIZE, MasterKey
from plinius.data import SealedDataset, seal_dataset
from plinius.errors import FormatError, IntegrityError, PliniusError, WrongKeyError

N, R = 40, 8  # 5 chunks


def _fields(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # "a" and "b" have the same record size, so their chunks are interchangeable in size.
    return {
        "a": rng.integers(0, 2**31, size=(N, 4), dtype=np.int32),
        "b": rng.standard_normal((N, 4)).astype(np.float32),
        "label": np.arange(N, dtype=np.int64),
    }


def _layout(ds: SealedDataset) -> tuple[int, int, list[int]]:
    """(data offset, chunk stride, per-field plaintext bytes per full chunk)."""
    lay = ds._layout
    return lay.data_offset, lay.chunk_stride, [R * f.record_bytes for f in lay.fields]


def _chunk_span(ds: SealedDataset, c: int, f: int) -> tuple[int, int]:
    lay = ds._layout
    off = lay.field_offset(c, f)
    return off, off + lay.chunk_len(c) * lay.fields[f].record_bytes + TAG_SIZE


@pytest.fixture
def sealed(shm_dir: Path, key: MasterKey) -> tuple[Path, str, bytes]:
    path = shm_dir / "d.pld"
    dsid = seal_dataset(path, key, _fields(), chunk_records=R)
    return path, dsid, path.read_bytes()


def _read_all(path: Path, key: MasterKey) -> None:
    with SealedDataset(path, key) as ds:
        ds.get_batch(range(len(ds)))


def test_untouched_file_reads(sealed: tuple[Path, str, bytes], key: MasterKey) -> None:
    path, dsid, _ = sealed
    with SealedDataset(path, key, expect_id=dsid) as ds:
        a, b, label = ds.get_batch(range(N))
        want = _fields()
        assert np.array_equal(a.numpy(), want["a"]) and np.array_equal(b.numpy(), want["b"])
        assert label.tolist() == list(range(N))
        ds.verify()


def test_flip_every_header_byte(sealed: tuple[Path, str, bytes], key: MasterKey) -> None:
    path, _, orig = sealed
    with SealedDataset(path, key) as ds:
        data_offset = ds._layout.data_offset
    for i in range(data_offset):
        bad = bytearray(orig)
        bad[i] ^= 0x01
        path.write_bytes(bytes(bad))
        if i < 8:
            expected: type[PliniusError] = FormatError  # magic: not a dataset at all
        elif i < 12:
            expected = FormatError  # version: unsupported
        elif 32 <= i < 48:
            expected = WrongKeyError  # the key fingerprint: refused before any MAC
        else:
            # header length, dataset id, JSON, zero padding, MAC: all signed
            expected = IntegrityError
        with pytest.raises(expected):
            SealedDataset(path, key)


def test_flip_bytes_in_every_chunk_and_tag(sealed: tuple[Path, str, bytes], key: MasterKey) -> None:
    path, _, orig = sealed
    with SealedDataset(path, key) as ds:
        spans = [(c, f, _chunk_span(ds, c, f)) for c in range(ds.num_chunks) for f in range(3)]
    for c, f, (lo, hi) in spans:
        for pos in (lo, (lo + hi) // 2, hi - TAG_SIZE - 1, hi - TAG_SIZE, hi - 1):
            bad = bytearray(orig)
            bad[pos] ^= 0x80
            path.write_bytes(bytes(bad))
            with SealedDataset(path, key) as ds:  # the header is fine
                name = ds.fields[f].name
                with pytest.raises(IntegrityError, match=f"chunk {c} of field '{name}'"):
                    ds[c * R]
                with pytest.raises(IntegrityError):
                    ds.verify()
                # Other chunks are untouched and still read.
                other = (c + 1) % ds.num_chunks
                assert int(ds[other * R][2]) == other * R


def test_swap_chunks_within_a_field(sealed: tuple[Path, str, bytes], key: MasterKey) -> None:
    path, _, orig = sealed
    with SealedDataset(path, key) as ds:
        (a0, a1), (b0, b1) = _chunk_span(ds, 0, 0), _chunk_span(ds, 1, 0)
    bad = bytearray(orig)
    bad[a0:a1], bad[b0:b1] = orig[b0:b1], orig[a0:a1]
    path.write_bytes(bytes(bad))
    with SealedDataset(path, key) as ds, pytest.raises(IntegrityError, match="chunk 0"):
        ds[0]
    with SealedDataset(path, key) as ds, pytest.raises(IntegrityError, match="chunk 1"):
        ds[R]


def test_swap_whole_chunks(sealed: tuple[Path, str, bytes], key: MasterKey) -> None:
    """Reorder chunk 1 and 2 entirely (all fields, same sizes)."""
    path, _, orig = sealed
    with SealedDataset(path, key) as ds:
        d, stride, _ = _layout(ds)
    c1, c2 = d + stride, d + 2 * stride
    bad = bytearray(orig)
    bad[c1 : c1 + stride], bad[c2 : c2 + stride] = orig[c2 : c2 + stride], orig[c1 : c1 + stride]
    path.write_bytes(bytes(bad))
    with pytest.raises(IntegrityError):
        _read_all(path, key)


def test_move_chunk_between_fields(sealed: tuple[Path, str, bytes], key: MasterKey) -> None:
    path, _, orig = sealed
    with SealedDataset(path, key) as ds:
        (a0, a1), (b0, b1) = _chunk_span(ds, 2, 0), _chunk_span(ds, 2, 1)
    assert a1 - a0 == b1 - b0
    bad = bytearray(orig)
    bad[b0:b1] = orig[a0:a1]  # field a's chunk 2 where field b's chunk 2 was
    path.write_bytes(bytes(bad))
    with SealedDataset(path, key) as ds:
        with pytest.raises(IntegrityError, match="chunk 2 of field 'b'"):
            ds[2 * R]
        assert int(ds[0][2]) == 0


def test_move_chunks_between_datasets_sealed_under_the_same_key(
    shm_dir: Path, sealed: tuple[Path, str, bytes], key: MasterKey
) -> None:
    path, _, orig = sealed
    other = shm_dir / "other.pld"
    seal_dataset(other, key, _fields(seed=1), chunk_records=R)
    o = other.read_bytes()
    assert len(o) == len(orig)  # same layout: every offset lines up
    with SealedDataset(path, key) as ds:
        d = ds._layout.data_offset
        lo, hi = _chunk_span(ds, 3, 1)
    # One chunk from the other dataset.
    bad = bytearray(orig)
    bad[lo:hi] = o[lo:hi]
    path.write_bytes(bytes(bad))
    with SealedDataset(path, key) as ds, pytest.raises(IntegrityError, match="chunk 3"):
        ds[3 * R]
    # All the data of the other dataset behind this header, and the reverse.
    path.write_bytes(orig[:d] + o[d:])
    with pytest.raises(IntegrityError):
        _read_all(path, key)
    path.write_bytes(o[:d] + orig[d:])
    with pytest.raises(IntegrityError):
        _read_all(path, key)


def test_swapped_dataset_is_caught_by_expect_id(
    shm_dir: Path, sealed: tuple[Path, str, bytes], key: MasterKey
) -> None:
    """A whole other dataset sealed under the same key is authentic: only its id differs."""
    path, dsid, _ = sealed
    other = shm_dir / "other.pld"
    other_id = seal_dataset(other, key, _fields(seed=1), chunk_records=R)
    path.write_bytes(other.read_bytes())
    with SealedDataset(path, key) as ds:  # no expectation: it opens, it is authentic
        assert ds.dataset_id == other_id
    with pytest.raises(IntegrityError, match=f"not the required {dsid}"):
        SealedDataset(path, key, expect_id=dsid)


@pytest.mark.parametrize("cut", [0, 4, 8, 20, 47, 48, 100, -(TAG_SIZE + 1), -1])
def test_truncation(sealed: tuple[Path, str, bytes], key: MasterKey, cut: int) -> None:
    path, _, orig = sealed
    path.write_bytes(orig[:cut])
    expected: type[PliniusError] = FormatError if 0 <= cut <= 4 else IntegrityError
    with pytest.raises(expected):
        SealedDataset(path, key)


def test_appended_bytes(sealed: tuple[Path, str, bytes], key: MasterKey) -> None:
    path, _, orig = sealed
    path.write_bytes(orig + b"\x00")
    with pytest.raises(IntegrityError, match="truncated or extended"):
        SealedDataset(path, key)


def test_drop_the_last_chunk(sealed: tuple[Path, str, bytes], key: MasterKey) -> None:
    """Cut a whole chunk off and fix the sizes in the header: the MAC catches it."""
    path, _, orig = sealed
    with SealedDataset(path, key) as ds:
        _, stride, _ = _layout(ds)
    hlen = struct.unpack_from("<I", orig, 12)[0]
    doc = json.loads(orig[48 : 48 + hlen])
    doc.update(records=N - R, chunks=4, file_size=len(orig) - stride)
    new = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    new = new + b" " * (hlen - len(new))
    assert len(new) == hlen
    path.write_bytes(orig[:48] + new + orig[48 + hlen : len(orig) - stride])
    with pytest.raises(IntegrityError, match="header failed authentication"):
        SealedDataset(path, key)


def test_wrong_key(sealed: tuple[Path, str, bytes], other_key: MasterKey) -> None:
    path, _, _ = sealed
    with pytest.raises(WrongKeyError, match="another key"):
        SealedDataset(path, other_key)


def test_wrong_key_with_forged_fingerprint(
    sealed: tuple[Path, str, bytes], key: MasterKey, other_key: MasterKey
) -> None:
    """The host writes the other key's fingerprint in: the header MAC still fails."""
    path, _, orig = sealed
    path.write_bytes(orig[:32] + other_key.fingerprint + orig[48:])
    with pytest.raises(IntegrityError):
        SealedDataset(path, other_key)
    with pytest.raises(WrongKeyError):
        SealedDataset(path, key)


def test_tampered_chunk_is_never_cached(sealed: tuple[Path, str, bytes], key: MasterKey) -> None:
    """A failed decryption leaves unauthenticated plaintext in a buffer: it must not be served."""
    path, _, orig = sealed
    with SealedDataset(path, key) as ds:
        lo, _hi = _chunk_span(ds, 1, 0)
        bad = bytearray(orig)
        bad[lo] ^= 1
        path.write_bytes(bytes(bad))  # the mapping is shared: the reader sees the change
        for _ in range(2):
            with pytest.raises(IntegrityError):
                ds[R]
        path.write_bytes(orig)
        assert np.array_equal(ds[R][0].numpy(), _fields()["a"][R])


def test_no_plaintext_record_in_the_file(shm_dir: Path, key: MasterKey) -> None:
    rng = np.random.default_rng(7)
    secret = rng.integers(0, 256, size=(300, 48), dtype=np.uint8)
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog....." * 300, np.uint8)
    path = shm_dir / "s.pld"
    seal_dataset(path, key, {"secret": secret, "text": text.reshape(300, 48)}, chunk_records=16)
    blob = path.read_bytes()
    for rec in secret:
        for lo in range(0, 48, 8):  # any 8-byte piece of any record
            assert rec[lo : lo + 8].tobytes() not in blob
    assert b"quick brown" not in blob and b"lazy dog" not in blob
    # What is visible by design: the header (field names, dtypes, shapes, counts).
    assert b'"name":"secret"' in blob


def test_forged_headers_with_valid_mac_are_format_errors(
    sealed: tuple[Path, str, bytes], key: MasterKey
) -> None:
    """Whoever holds the key could sign nonsense; the reader still validates everything."""
    path, dsid, orig = sealed
    dataset_id = bytes.fromhex(dsid)
    hlen = struct.unpack_from("<I", orig, 12)[0]
    doc = json.loads(orig[48 : 48 + hlen])

    def write(raw: bytes) -> None:
        d = -(-(48 + len(raw) + 32) // 64) * 64
        head = b"PLINIUSD" + struct.pack("<II", 1, len(raw)) + dataset_id + key.fingerprint
        signed = head + raw + bytes(d - 32 - 48 - len(raw))
        mac = hmac.new(key.derive("data-header", dataset_id), signed, "sha256").digest()
        path.write_bytes(signed + mac + orig[doc["data_offset"] :])

    write(orig[48 : 48 + hlen])  # sanity: re-signing the same header opens
    with SealedDataset(path, key) as ds:
        assert len(ds) == N

    def variant(**change: object) -> bytes:
        d = dict(doc, **change)
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    bad_headers = [
        b"[]",
        b"not json",
        b"\xff\xfe",
        variant(records=-1),
        variant(records=True),
        variant(chunk_records=0),
        variant(chunk_records=N + 1),
        variant(chunks=99),
        variant(format="other"),
        variant(extra=1),
        variant(fields=[]),
        variant(fields=[{"name": "a", "dtype": "object", "shape": []}]),
        variant(fields=[{"name": "a", "dtype": "uint8", "shape": [-1]}]),
        variant(fields=[{"name": "a", "dtype": "uint8", "shape": [2**40]}]),
        variant(fields=[{"name": "a", "dtype": "uint8", "shape": [1] * 17}]),
        variant(fields=[{"name": "a", "dtype": "uint8"}]),
        variant(fields=[dict(doc["fields"][0]), dict(doc["fields"][0])]),
        variant(records=2**60, chunk_records=2**59),
        orig[48 : 48 + hlen - 1] + b',"records":1}',  # duplicate key
        orig[48 : 48 + hlen].replace(b'"records":40', b'"records":NaN'),
    ]
    for raw in bad_headers:
        write(raw)
        with pytest.raises((FormatError, IntegrityError)):
            SealedDataset(path, key)
