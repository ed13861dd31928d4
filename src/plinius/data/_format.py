"""The sealed dataset file format, version 1: layout, header, keys (internal).

Every value read from disk is validated here before anything uses it; the
public API lives in :mod:`plinius.data`, the contract in docs/FORMAT.md.
"""

from __future__ import annotations

import hmac
import json
import math
import mmap
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._hexutil import hex_exact
from .._magic import DATASET, MIRROR
from ..crypto import MAX_AEAD_BYTES, TAG_SIZE, Aead, MasterKey, aad
from ..errors import (
    ConfigError,
    FormatError,
    IntegrityError,
    StorageError,
    WrongKeyError,
    storage_error,
)

MAGIC = DATASET
VERSION = 1
PREFIX = struct.Struct("<8sII16s16s")  # magic, version, header length, dataset id, fingerprint
PREFIX_SIZE = PREFIX.size  # 48
MAC_SIZE = 32
ID_SIZE = 16
DATA_ALIGN = 64
MAX_HEADER_BYTES = 1 << 20
MAX_FIELDS = 256
MAX_NAME_CHARS = 255
MAX_NDIM = 16
MAX_RECORDS = 1 << 48
# Knobs, measured with benchmarks/bench_data.py (docs/FORMAT.md "Chunk size"):
# with the default chunk shuffle, a batch of 128 MNIST records cost about 3x
# less at 256 KiB chunks than at 64 or 16 KiB (fewer chunks to fetch per
# batch), and AES-GCM runs at ~98% of its per-call peak there. A fully
# shuffled order prefers small chunks (~16 KiB): pass chunk_records.
DEFAULT_CHUNK_BYTES = 256 * 1024
MAX_DEFAULT_CHUNK_RECORDS = 65536
DEFAULT_CACHE_CHUNKS = 8
CACHE_BYTES_LIMIT = 64 * 1024 * 1024

HEADER_PURPOSE = "data-header"  # never equal to "data/" + name: no key is shared
_AAD_TAG = "plinius-dataset/v1/chunk"

# dtype name (as stored) -> (torch dtype, numpy dtype or None where numpy has none)
DTYPES: dict[str, tuple[torch.dtype, np.dtype[Any] | None]] = {
    "bool": (torch.bool, np.dtype(np.bool_)),
    "uint8": (torch.uint8, np.dtype(np.uint8)),
    "int8": (torch.int8, np.dtype(np.int8)),
    "int16": (torch.int16, np.dtype(np.int16)),
    "uint16": (torch.uint16, np.dtype(np.uint16)),
    "int32": (torch.int32, np.dtype(np.int32)),
    "uint32": (torch.uint32, np.dtype(np.uint32)),
    "int64": (torch.int64, np.dtype(np.int64)),
    "uint64": (torch.uint64, np.dtype(np.uint64)),
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, None),
    "float32": (torch.float32, np.dtype(np.float32)),
    "float64": (torch.float64, np.dtype(np.float64)),
    "complex64": (torch.complex64, np.dtype(np.complex64)),
    "complex128": (torch.complex128, np.dtype(np.complex128)),
}
SUPPORTED_DTYPES = tuple(DTYPES)


@dataclass(frozen=True)
class FieldInfo:
    """One field of a sealed dataset: its name, element dtype and per-record shape.

    Unpacks like a tuple: ``name, dtype, shape = field``.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def dtype_name(self) -> str:
        """The dtype as stored in the header (``"uint8"``, ``"bfloat16"``, ...)."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def record_bytes(self) -> int:
        """Bytes of one record of this field."""
        return math.prod(self.shape) * self.dtype.itemsize

    def __iter__(self) -> Iterator[Any]:
        return iter((self.name, self.dtype, self.shape))


@dataclass(frozen=True)
class Layout:
    """Where everything lives in a sealed dataset file; computed, never read from disk."""

    records: int
    chunk_records: int
    fields: tuple[FieldInfo, ...]
    data_offset: int
    # Derived once: the read path asks for these for every chunk.
    record_bytes: tuple[int, ...] = field(init=False)
    chunk_stride: int = field(init=False)

    def __post_init__(self) -> None:
        rb = tuple(f.record_bytes for f in self.fields)
        object.__setattr__(self, "record_bytes", rb)
        object.__setattr__(self, "chunk_stride", sum(self.chunk_records * b + TAG_SIZE for b in rb))

    @property
    def num_chunks(self) -> int:
        return -(-self.records // self.chunk_records)

    def chunk_len(self, c: int) -> int:
        """Records in chunk ``c`` (the last one may be short)."""
        return min(self.chunk_records, self.records - c * self.chunk_records)

    def spans(self, c: int) -> list[tuple[int, int]]:
        """(file offset, plaintext bytes) of each field's ciphertext in chunk ``c``;
        each is followed by its 16-byte tag."""
        n = self.chunk_len(c)
        off = self.data_offset + c * self.chunk_stride
        out = []
        for b in self.record_bytes:
            out.append((off, n * b))
            off += n * b + TAG_SIZE
        return out

    def field_offset(self, c: int, f: int) -> int:
        """File offset of field ``f``'s ciphertext in chunk ``c``."""
        return self.spans(c)[f][0]

    @property
    def file_size(self) -> int:
        off, length = self.spans(self.num_chunks - 1)[-1]
        return off + length + TAG_SIZE


def data_offset_for(header_len: int) -> int:
    end = PREFIX_SIZE + header_len + MAC_SIZE
    return -(-end // DATA_ALIGN) * DATA_ALIGN


def header_json(layout: Layout) -> bytes:
    doc = {
        "format": "plinius-dataset",
        "records": layout.records,
        "chunk_records": layout.chunk_records,
        "chunks": layout.num_chunks,
        "fields": [
            {"name": f.name, "dtype": f.dtype_name, "shape": list(f.shape)} for f in layout.fields
        ],
        "data_offset": layout.data_offset,
        "file_size": layout.file_size,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode()


def header_mac(header_key: bytes, signed: bytes | memoryview) -> bytes:
    return hmac.new(header_key, signed, "sha256").digest()


def field_aad_prefix(dataset_id: bytes, f: int, name: str) -> bytes:
    """The constant part of a field's chunk AAD (``aad`` fields concatenate)."""
    return aad(_AAD_TAG, dataset_id, f, name)


def field_aad(prefix: bytes, c: int, n: int) -> bytes:
    """AAD of chunk ``c`` (``n`` records) of a field: aad(tag, dataset id, f, name, c, n)."""
    return prefix + aad(c, n)


class DatasetKeys:
    """The purpose keys of one dataset (never the master key itself)."""

    __slots__ = ("aeads", "field_keys", "fingerprint", "header_key")

    def __init__(self, fingerprint: bytes, header_key: bytes, field_keys: list[bytes]) -> None:
        self.fingerprint = fingerprint
        self.header_key = header_key
        self.field_keys = field_keys
        self.aeads = [Aead(k) for k in field_keys]

    @classmethod
    def derive(cls, key: MasterKey, dataset_id: bytes, names: Sequence[str]) -> DatasetKeys:
        return cls(
            key.fingerprint,
            key.derive(HEADER_PURPOSE, dataset_id),
            [key.derive("data/" + n, dataset_id) for n in names],
        )

    def __repr__(self) -> str:
        return "DatasetKeys(<hidden>)"


# -- header parsing (every value from disk is validated before use) ----------


def check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise ConfigError(
            f"{where}: field names are non-empty strings of at most {MAX_NAME_CHARS} characters"
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ConfigError(f"{where}: field name {name!r} contains control characters")
    return name


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _int(doc: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = doc.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{key!r} must be an integer in [{lo}, {hi}]")
    return v


def parse_header(raw: bytes, header_len: int) -> Layout:
    """The layout described by a header, checked for consistency (ValueError if not)."""
    doc = json.loads(
        raw.decode("utf-8"),
        object_pairs_hook=_reject_duplicates,
        parse_constant=_reject_constant,
    )
    if not isinstance(doc, dict):
        raise ValueError("the header is not a JSON object")
    expected = {
        "format",
        "records",
        "chunk_records",
        "chunks",
        "fields",
        "data_offset",
        "file_size",
    }
    if set(doc) != expected:
        raise ValueError(f"header keys {sorted(doc)} are not {sorted(expected)}")
    if doc["format"] != "plinius-dataset":
        raise ValueError("the header does not describe a plinius dataset")
    records = _int(doc, "records", 1, MAX_RECORDS)
    chunk_records = _int(doc, "chunk_records", 1, records)
    raw_fields = doc["fields"]
    if not isinstance(raw_fields, list) or not 1 <= len(raw_fields) <= MAX_FIELDS:
        raise ValueError(f"'fields' must be a list of 1 to {MAX_FIELDS} fields")
    fields: list[FieldInfo] = []
    for i, rf in enumerate(raw_fields):
        if not isinstance(rf, dict) or set(rf) != {"name", "dtype", "shape"}:
            raise ValueError(f"field {i} must have exactly 'name', 'dtype' and 'shape'")
        try:
            name = check_name(rf["name"], f"field {i}")
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        if name in {f.name for f in fields}:
            raise ValueError(f"field name {name!r} appears twice")
        dt = rf["dtype"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise ValueError(f"field {name!r} has unsupported dtype {dt!r}")
        shape = rf["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or any(type(d) is not int or not 1 <= d <= MAX_AEAD_BYTES for d in shape)
        ):
            raise ValueError(f"field {name!r} has an invalid shape {shape!r}")
        fields.append(FieldInfo(name, DTYPES[dt][0], tuple(shape)))
    for f in fields:
        # Each field's chunk goes through one AES-GCM call, which has a size cap.
        if chunk_records * f.record_bytes + TAG_SIZE > MAX_AEAD_BYTES:
            raise ValueError(f"chunks of field {f.name!r} exceed the AES-GCM size limit")
    layout = Layout(records, chunk_records, tuple(fields), data_offset_for(header_len))
    if _int(doc, "chunks", 1, MAX_RECORDS) != layout.num_chunks:
        raise ValueError("'chunks' does not match records and chunk_records")
    if _int(doc, "data_offset", 0, 1 << 62) != layout.data_offset:
        raise ValueError("'data_offset' does not match the header length")
    if _int(doc, "file_size", 0, 1 << 62) != layout.file_size:
        raise ValueError("'file_size' does not match the layout")
    return layout


@dataclass(frozen=True)
class Header:
    dataset_id: bytes
    fingerprint: bytes
    header_len: int
    signed_len: int  # bytes the MAC covers: prefix, JSON and zero padding (all before the MAC)

    @property
    def json_slice(self) -> slice:
        return slice(PREFIX_SIZE, PREFIX_SIZE + self.header_len)

    mac: bytes


def read_prefix(buf: memoryview, path: Path) -> Header:
    """Magic, version and the sizes of the header, checked against the file size."""
    size = len(buf)
    if size < len(MAGIC) or bytes(buf[: len(MAGIC)]) != MAGIC:
        if bytes(buf[: len(MAGIC)]) == MIRROR:
            raise FormatError(f"{path} is a plinius mirror, not a sealed dataset")
        raise FormatError(f"{path} is not a plinius sealed dataset (bad magic); check the path")
    if size < PREFIX_SIZE:
        raise IntegrityError(f"{path} is truncated ({size} bytes); re-seal it from the source data")
    _magic, version, header_len, dataset_id, fingerprint = PREFIX.unpack_from(buf, 0)
    if version != VERSION:
        raise FormatError(
            f"{path} has dataset format version {version}; this plinius reads version {VERSION} "
            "(upgrade plinius or re-seal the data)"
        )
    if not 2 <= header_len <= MAX_HEADER_BYTES or data_offset_for(header_len) > size:
        raise IntegrityError(
            f"{path}: the header length {header_len} does not fit the file ({size} bytes): "
            "truncated or corrupted; re-seal it from the source data"
        )
    # The MAC sits just before the data, so it covers the padding too: every
    # byte of the file is authenticated, by the header MAC or a chunk tag.
    signed_len = data_offset_for(header_len) - MAC_SIZE
    mac = bytes(buf[signed_len : signed_len + MAC_SIZE])
    return Header(dataset_id, fingerprint, header_len, signed_len, mac)


def check_fingerprint(hdr: Header, fingerprint: bytes, path: Path) -> None:
    if not hmac.compare_digest(hdr.fingerprint, fingerprint):
        raise WrongKeyError(
            f"{path} was sealed under another key (fingerprint {hdr.fingerprint.hex()}, "
            f"given key {fingerprint.hex()}); use the data owner's key"
        )


def authenticate_header(buf: memoryview, hdr: Header, header_key: bytes, path: Path) -> Layout:
    """Verify the header MAC, then parse it; the layout must match the file size."""
    # Copies (the header is small): no view into the mapping may outlive this call,
    # not even in a traceback, or the mapping could not be closed.
    mac = header_mac(header_key, bytes(buf[: hdr.signed_len]))
    if not hmac.compare_digest(mac, hdr.mac):
        raise IntegrityError(
            f"{path}: the dataset header failed authentication: tampered with or corrupted; "
            "re-seal it from the source data"
        )
    try:
        layout = parse_header(bytes(buf[hdr.json_slice]), hdr.header_len)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # Authentic but inconsistent: written by something that is not plinius.
        raise FormatError(f"{path}: invalid dataset header: {exc}") from exc
    if layout.file_size != len(buf):
        raise IntegrityError(
            f"{path} is {len(buf)} bytes but its header says {layout.file_size}: "
            "truncated or extended; re-seal it from the source data"
        )
    return layout


def normalize_id(expect_id: str | None) -> bytes | None:
    if expect_id is None:
        return None
    # Surrounding whitespace only (a pasted line); inside, exactly the hex digits.
    try:
        return hex_exact(expect_id.strip(), ID_SIZE)
    except ValueError:
        raise ConfigError(f"a dataset id is {2 * ID_SIZE} hex digits, not {expect_id!r}") from None


def map_readonly(path: Path) -> mmap.mmap:
    """Map a file read-only. Pages are faulted in lazily: opening costs nothing per record."""
    try:
        # O_NONBLOCK: a FIFO in place of the dataset must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise storage_error(exc, f"cannot open dataset {path}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(
                f"dataset {path} is not a regular file; give the path of a .pld file"
            )
        size = st.st_size
        if size == 0:
            raise FormatError(f"{path} is empty; it is not a plinius sealed dataset")
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError as exc:
        raise storage_error(exc, f"cannot map dataset {path}") from exc
    finally:
        os.close(fd)  # the mapping keeps its own reference to the file


def check_expected(dataset_id: bytes, want: bytes | None, path: Path) -> None:
    if want is not None and not hmac.compare_digest(dataset_id, want):
        raise IntegrityError(
            f"{path} holds dataset {dataset_id.hex()}, not the required {want.hex()}: "
            "another dataset sealed under the same key (or the wrong file was given)"
        )
