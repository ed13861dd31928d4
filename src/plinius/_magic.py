"""The first eight bytes of every file plinius writes, in one place.

A mirror, a sealed dataset and a sealed master key each start with their own
magic, so a file given in the wrong place is named for what it is. This module
imports nothing else from plinius: every layer may use it.
"""

from __future__ import annotations

import os
from typing import Literal

__all__ = [
    "DATASET",
    "DCP_DATA",
    "DCP_METADATA",
    "MAGIC_LEN",
    "MIRROR",
    "SEALED_KEY",
    "FileKind",
    "kind_of",
    "sniff",
]

MIRROR = b"PLINIUSM"  # a mirror of the training state (plinius.mirror)
DATASET = b"PLINIUSD"  # a sealed dataset (plinius.data)
SEALED_KEY = b"PLNSEAL\0"  # a master key sealed to a platform (plinius.tee.sealing)
# A torch.distributed.checkpoint directory (plinius.dcp): its metadata and data files.
# Not sniffed: the CLI's ls and rm handle single-file kinds, and a DCP checkpoint is a directory.
DCP_METADATA = b"PLNDCPM\0"
DCP_DATA = b"PLNDCPD\0"
MAGIC_LEN = 8

FileKind = Literal["mirror", "dataset", "sealed-key"]

_KINDS: dict[bytes, FileKind] = {MIRROR: "mirror", DATASET: "dataset", SEALED_KEY: "sealed-key"}


def kind_of(head: bytes) -> FileKind | None:
    """Name the kind of file whose first bytes are ``head``.

    Args:
        head: the file's first bytes (only the first ``MAGIC_LEN`` are looked at).

    Returns:
        ``"mirror"``, ``"dataset"`` or ``"sealed-key"``; None for any other start.
    """
    return _KINDS.get(bytes(head[:MAGIC_LEN]))


def sniff(path: str | os.PathLike[str]) -> FileKind | None:
    """Name the kind of plinius file at ``path`` from its magic.

    Only the first ``MAGIC_LEN`` bytes are read; nothing is authenticated.

    Args:
        path: the file to look at. Give a regular file: a FIFO would block.

    Returns:
        ``"mirror"``, ``"dataset"`` or ``"sealed-key"``; None when the file
        starts with none of their magics (or is shorter than one).

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as f:
        return kind_of(f.read(MAGIC_LEN))
