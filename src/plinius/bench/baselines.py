"""What plinius is measured against: an encrypted checkpoint written to disk.

The conventional way to protect a checkpoint: ``torch.save`` the state into a
buffer, encrypt it with AES-256-GCM, write it to a temporary file, fsync, rename
over the old checkpoint and fsync the directory (so a crash leaves either the
old or the new file); restore reads, decrypts and ``torch.load``s it back.
Used by ``plinius demo`` and ``plinius bench``; each phase is timed separately.

It uses ``torch.save`` (pickle) on purpose: that is what it stands for. No plinius
format uses pickle, and this file is only ever read back by the benchmark that wrote it.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._fsutil import fsync_dir
from ..crypto import MasterKey, counter_nonce

__all__ = ["PhaseTimes", "encrypted_checkpoint_load", "encrypted_checkpoint_save"]


@dataclass
class PhaseTimes:
    """Seconds spent in each phase of a save or a restore."""

    serialize: float = 0.0
    crypt: float = 0.0
    io: float = 0.0

    @property
    def total(self) -> float:
        """All phases together."""
        return self.serialize + self.crypt + self.io


def encrypted_checkpoint_save(
    state: dict[str, Any], path: str | os.PathLike[str], key: MasterKey
) -> PhaseTimes:
    """Save ``state`` (state_dicts, tensors, plain values) as an encrypted file, durably."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    times = PhaseTimes()
    p = Path(path)
    t0 = time.perf_counter()
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    t1 = time.perf_counter()
    salt = os.urandom(16)
    aes = AESGCM(key.derive("baseline-checkpoint", salt))
    blob = aes.encrypt(counter_nonce(0), data, salt)
    t2 = time.perf_counter()
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(salt)
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fsync_dir(p.parent)
    t3 = time.perf_counter()
    times.serialize, times.crypt, times.io = t1 - t0, t2 - t1, t3 - t2
    del data
    buf.close()
    return times


def encrypted_checkpoint_load(
    path: str | os.PathLike[str], key: MasterKey
) -> tuple[dict[str, Any], PhaseTimes]:
    """Read, decrypt and ``torch.load`` a checkpoint written by the function above."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    times = PhaseTimes()
    t0 = time.perf_counter()
    raw = Path(path).read_bytes()
    t1 = time.perf_counter()
    view = memoryview(raw)  # no copy of the ciphertext
    salt, blob = bytes(view[:16]), view[16:]
    aes = AESGCM(key.derive("baseline-checkpoint", salt))
    data = aes.decrypt(counter_nonce(0), blob, salt)
    t2 = time.perf_counter()
    state = torch.load(io.BytesIO(data), weights_only=True)
    t3 = time.perf_counter()
    times.io, times.crypt, times.serialize = t1 - t0, t2 - t1, t3 - t2
    return state, times
