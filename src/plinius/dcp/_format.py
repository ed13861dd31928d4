"""The bytes of an encrypted DCP checkpoint: file names, headers, AAD, the metadata codec.

A checkpoint directory holds one committed ``plinius.metadata`` and the data
files it names, ``<checkpoint id>-<file index>.pdcp``. Layouts (docs/FORMAT.md):

* metadata: ``magic | version u32 | 0 u32 | key fingerprint (16) | checkpoint
  id (16) | body length u64`` (56 bytes), then the body, AES-256-GCM under the
  checkpoint key with the header as AAD: JSON of torch's ``Metadata`` plus the
  sequence number, the counter value expected and the data files;
* data file: ``magic | version u32 | file index u32 | checkpoint id (16) | tag
  (16)`` (48 bytes; the tag authenticates the header), then the items, each
  in pieces of at most ``PIECE_BYTES``, every piece followed by its tag.

The checkpoint key is HKDF(master, salt=checkpoint id, "plinius/v1/dcp"); the
id is random per save, so the counter nonces (piece counter, file index) never
repeat under one key. No pickle: the metadata is JSON, decoded through
allow-lists of dtypes, layouts and memory formats.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from .. import _magic
from ..crypto import TAG_SIZE, aad, counter_nonce
from ..errors import FormatError

__all__ = [
    "DATA_HEADER",
    "DATA_SUFFIX",
    "FORMAT_VERSION",
    "META_DOMAIN",
    "META_HEADER",
    "METADATA_NAME",
    "PIECE_BYTES",
    "FileSpec",
    "ItemInfo",
    "MetaHeader",
    "data_file_name",
    "data_header",
    "data_header_aad",
    "decode_metadata",
    "dtype_of",
    "encode_metadata",
    "item_aad",
    "pack_meta_header",
    "piece_spans",
    "stored_length",
    "unpack_data_header",
    "unpack_meta_header",
]

FORMAT_VERSION = 1
METADATA_NAME = "plinius.metadata"
DATA_SUFFIX = ".pdcp"
# One AES-GCM call takes at most 2**31 - 1 bytes; 64 MiB pieces keep memory
# for a read bounded too.
PIECE_BYTES = 64 << 20
# The metadata's nonce domain; data files use their index (below 2**32 - 1).
META_DOMAIN = 0xFFFFFFFF

META_HEADER = struct.Struct("<8sII16s16sQ")  # magic, version, 0, fingerprint, ckpt id, body len
DATA_HEADER = struct.Struct("<8sII16s")  # magic, version, file index, ckpt id; then a tag

# Bounds on what a metadata header may claim before anything is allocated.
MAX_METADATA_BYTES = 1 << 30


@dataclass(frozen=True)
class FileSpec:
    """What the coordinator hands each rank in its plan: the checkpoint id and its file.

    ``superseded`` names the data files of the committed checkpoint this save
    replaces (not on disk: plans only travel between ranks).
    """

    ckpt_id: bytes
    file_index: int
    superseded: tuple[str, ...] = ()


@dataclass(frozen=True)
class ItemInfo:
    """Where one saved item lives: its file, offset, plaintext size and first nonce.

    ``dtype`` and ``shape`` describe a tensor chunk as stored (None for bytes).
    """

    file: str
    offset: int
    nbytes: int
    nonce: int
    dtype: str | None
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class MetaHeader:
    """The plaintext, authenticated header of a metadata file."""

    fingerprint: bytes
    ckpt_id: bytes
    body_len: int
    raw: bytes


def data_file_name(ckpt_id: bytes, index: int) -> str:
    """The name of file ``index`` of checkpoint ``ckpt_id``."""
    return f"{ckpt_id.hex()}-{index}{DATA_SUFFIX}"


def piece_spans(nbytes: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each piece of an item of ``nbytes`` (one piece when empty)."""
    if nbytes == 0:
        return [(0, 0)]
    return [(o, min(PIECE_BYTES, nbytes - o)) for o in range(0, nbytes, PIECE_BYTES)]


def stored_length(nbytes: int) -> int:
    """Bytes an item of ``nbytes`` takes in its file: the pieces and their tags."""
    return nbytes + TAG_SIZE * len(piece_spans(nbytes))


def item_aad(ckpt_id: bytes, info: ItemInfo, index: MetadataIndex, piece: int, kind: str) -> bytes:
    """The AAD of one piece: binds checkpoint, file, place, item and piece."""
    offset = None if index.offset is None else tuple(index.offset)
    return aad(
        "plinius/dcp/item",
        ckpt_id,
        info.file,
        info.offset,
        info.nonce,
        piece,
        index.fqn,
        offset,
        kind,
        info.dtype,
        info.shape,
        info.nbytes,
    )


def data_header(ckpt_id: bytes, file_index: int) -> bytes:
    """The 32 plaintext bytes a data file starts with (its tag follows)."""
    return DATA_HEADER.pack(_magic.DCP_DATA, FORMAT_VERSION, file_index, ckpt_id)


def data_header_aad(header: bytes, name: str) -> bytes:
    """The AAD of a data file's header tag: the header and the file's name."""
    return aad("plinius/dcp/data-header", header, name)


def unpack_data_header(raw: bytes, name: str) -> tuple[int, bytes]:
    """``(file index, checkpoint id)`` of a data file header.

    Raises:
        FormatError: not a plinius DCP data file, or another version.
    """
    if len(raw) < DATA_HEADER.size or raw[:8] != _magic.DCP_DATA:
        raise FormatError(f"{name} is not a plinius DCP data file (bad magic or too short)")
    _, version, index, ckpt_id = DATA_HEADER.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise FormatError(f"{name}: DCP data format version {version} is not supported")
    return index, ckpt_id


def pack_meta_header(fingerprint: bytes, ckpt_id: bytes, body_len: int) -> bytes:
    """The 56 plaintext bytes a metadata file starts with."""
    return META_HEADER.pack(_magic.DCP_METADATA, FORMAT_VERSION, 0, fingerprint, ckpt_id, body_len)


def unpack_meta_header(raw: bytes, label: str) -> MetaHeader:
    """Parse and range-check a metadata header.

    Raises:
        FormatError: not a plinius DCP metadata file, another version, a bad length.
    """
    if len(raw) < META_HEADER.size or raw[:8] != _magic.DCP_METADATA:
        raise FormatError(f"{label} is not a plinius DCP metadata file (bad magic or too short)")
    _, version, zero, fp, ckpt_id, body_len = META_HEADER.unpack_from(raw)
    if version != FORMAT_VERSION or zero != 0:
        raise FormatError(f"{label}: DCP metadata format version {version} is not supported")
    if not TAG_SIZE <= body_len <= MAX_METADATA_BYTES:
        raise FormatError(f"{label}: metadata body length {body_len} is out of range")
    return MetaHeader(fp, ckpt_id, body_len, bytes(raw[: META_HEADER.size]))


def meta_nonce() -> bytes:
    """The metadata's nonce: its key is fresh per checkpoint id, written once."""
    return counter_nonce(0, META_DOMAIN)


# ---------------------------------------------------------------- metadata codec
_DTYPES: dict[str, torch.dtype] = {
    str(d): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.uint16,
        torch.uint32,
        torch.uint64,
    )
}
_LAYOUTS = {str(x): x for x in (torch.strided, torch.sparse_coo)}
_MEMORY_FORMATS = {
    str(x): x for x in (torch.contiguous_format, torch.channels_last, torch.preserve_format)
}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (``"torch.float32"``), from an allow-list.

    Raises:
        FormatError: not a dtype this format stores.
    """
    try:
        return _DTYPES[name]
    except KeyError:
        raise FormatError(f"unsupported tensor dtype {name!r} in a DCP checkpoint") from None


def _plain(x: Any) -> Any:
    """Encode planner data (dicts, lists, tuples, str, int, float, bool, None) exactly."""
    if x is None or isinstance(x, bool | str):
        return x
    if isinstance(x, int):
        return {"i": str(x)}
    if isinstance(x, float):
        return {"f": x.hex()}
    if isinstance(x, tuple):
        return {"tuple": [_plain(v) for v in x]}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {"dict": [[_plain(k), _plain(v)] for k, v in x.items()]}
    raise FormatError(
        f"the DCP planner data holds a {type(x).__name__}, which plinius does not store "
        "(use DCP's default planner, or a planner whose data is plain values)"
    )


def _unplain(x: Any) -> Any:
    if x is None or isinstance(x, bool | str):
        return x
    if isinstance(x, list):
        return [_unplain(v) for v in x]
    if isinstance(x, dict) and len(x) == 1:
        ((tag, v),) = x.items()
        if tag == "i":
            return int(v)
        if tag == "f":
            return float.fromhex(v)
        if tag == "tuple":
            return tuple(_unplain(e) for e in v)
        if tag == "dict":
            return {_unplain(k): _unplain(e) for k, e in v}
    raise FormatError("malformed planner data in a DCP metadata body")


def _storage(v: Any) -> Any:
    if isinstance(v, BytesStorageMetadata):
        return {"t": "bytes"}
    if isinstance(v, TensorStorageMetadata):
        p = v.properties
        return {
            "t": "tensor",
            "dtype": str(p.dtype),
            "layout": str(p.layout),
            "requires_grad": bool(p.requires_grad),
            "memory_format": str(p.memory_format),
            "pin_memory": bool(p.pin_memory),
            "size": list(v.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in v.chunks],
        }
    raise FormatError(f"unsupported DCP storage metadata {type(v).__name__}")


def _unstorage(v: dict[str, Any]) -> TensorStorageMetadata | BytesStorageMetadata:
    if v["t"] == "bytes":
        return BytesStorageMetadata()
    props = TensorProperties(
        dtype=dtype_of(v["dtype"]),
        layout=_LAYOUTS[v["layout"]],
        requires_grad=bool(v["requires_grad"]),
        memory_format=_MEMORY_FORMATS[v["memory_format"]],
        pin_memory=bool(v["pin_memory"]),
    )
    chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in v["chunks"]]
    return TensorStorageMetadata(props, torch.Size(v["size"]), chunks)


def _index(i: MetadataIndex) -> list[Any]:
    return [i.fqn, None if i.offset is None else list(i.offset), i.index]


def _unindex(v: list[Any]) -> MetadataIndex:
    fqn, offset, index = v
    return MetadataIndex(fqn, None if offset is None else torch.Size(offset), index)


def encode_metadata(
    md: Metadata, storage: dict[MetadataIndex, ItemInfo], extra: dict[str, Any]
) -> bytes:
    """JSON of torch's ``Metadata``, the item table and plinius' own fields."""
    sm = md.storage_meta
    doc = {
        "plinius": extra,
        "version": md.version,
        "state_dict_metadata": {k: _storage(v) for k, v in md.state_dict_metadata.items()},
        "planner_data": _plain(md.planner_data),
        "storage_meta": None
        if sm is None
        else {
            "checkpoint_id": None if sm.checkpoint_id is None else str(sm.checkpoint_id),
            "save_id": sm.save_id,
            "load_id": sm.load_id,
            "modules": list(sm.modules),
        },
        "items": [
            [_index(k), [i.file, i.offset, i.nbytes, i.nonce, i.dtype, i.shape]]
            for k, i in storage.items()
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def decode_metadata(body: bytes, label: str) -> tuple[Metadata, dict[str, Any]]:
    """torch's ``Metadata`` (its ``storage_data`` the item table) and plinius' fields.

    Raises:
        FormatError: the body (authenticated already) is not this format's JSON.
    """
    try:
        doc = json.loads(body)
        items = {
            _unindex(k): ItemInfo(
                str(f), int(o), int(n), int(c), d, None if s is None else tuple(int(x) for x in s)
            )
            for k, (f, o, n, c, d, s) in doc["items"]
        }
        sm = doc["storage_meta"]
        md = Metadata(
            state_dict_metadata={k: _unstorage(v) for k, v in doc["state_dict_metadata"].items()},
            planner_data=_unplain(doc["planner_data"]),
            storage_data=items,
            storage_meta=None if sm is None else StorageMeta(**sm),
            version=doc["version"],
        )
        extra = doc["plinius"]
    except FormatError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{label}: malformed metadata body ({exc})") from exc
    return md, extra
