"""Peer replicas of a process's own part of the training state, sealed for its peers.

Under DistributedDataParallel the model, the optimizer, the scheduler, the
data order and the losses are the same in every process: any survivor holds
them. What only one process holds is small: its random generators (Python's,
NumPy's, torch's CPU one) and its module buffers (BatchNorm statistics, which
each process updates from its own share of the batch). :class:`UniquePart`
packs exactly that into a fixed number of bytes (the same in every process of
a job: the layout follows the model), and :func:`seal` encrypts it into a
*replica blob* that the other processes keep in their own mirrors.

A blob is ``MAGIC | salt (16) | AES-256-GCM(ciphertext | tag)``. Its key is
derived from the master key, the job id and the blob's random salt (a fresh
key per blob, so the nonce is a constant). The associated data binds the job,
the owner (the rank whose part it is: the blob's slot in the gathered
replicas), the step and the layout (names, dtypes and shapes of what is
packed): a blob flipped, moved to another owner's slot, replayed from another
step or job, or read into another model is an :class:`IntegrityError`.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct

import numpy as np
import torch
from torch import nn

from .crypto import TAG_SIZE, Aead, MasterKey, aad
from .errors import IntegrityError, StateMismatchError

__all__ = ["BLOB_OVERHEAD", "UniquePart", "open_sealed", "seal"]

MAGIC = b"PLR1"
_SALT = 16
_NONCE = bytes(12)  # the key is fresh per blob (random salt): one nonce per key
BLOB_OVERHEAD = len(MAGIC) + _SALT + TAG_SIZE

# Python's Mersenne Twister: version, 625 words (the last is the index), gauss_next.
_PY_WORDS = 625
# NumPy's legacy generator: 624 words, then pos, has_gauss, cached_gaussian.
_NP_WORDS = 624
_SCALARS = struct.Struct("<qqqqd?d")  # py version, np pos, np has_gauss, -, np cached, gauss?, g


class UniquePart:
    """What only this process holds of a DDP job's state, as a fixed number of bytes.

    The global generators (Python, NumPy, torch CPU) and the buffers of
    ``module`` (in ``named_buffers`` order). CUDA generators and private
    ``torch.Generator`` objects are not packed.

    Args:
        module: the model inside DDP.
    """

    def __init__(self, module: nn.Module) -> None:
        self.buffers = [(n, b) for n, b in module.named_buffers()]
        self._torch_rng = torch.get_rng_state().numel()
        h = hashlib.sha256(b"plinius unique part v1")
        h.update(struct.pack("<q", self._torch_rng))
        for n, b in self.buffers:
            h.update(f"{n}|{b.dtype}|{tuple(b.shape)}\n".encode())
        self.layout = h.digest()
        self.size = (
            _SCALARS.size
            + 4 * (_PY_WORDS + _NP_WORDS)
            + self._torch_rng
            + sum(b.numel() * b.element_size() for _, b in self.buffers)
        )

    def pack(self) -> bytes:
        """The generators' states and the buffers, now."""
        version, internal, gauss = random.getstate()
        name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
        if name != "MT19937":  # pragma: no cover - NumPy's legacy generator is always MT19937
            raise StateMismatchError(f"NumPy's global generator is {name}, not MT19937")
        parts = [
            _SCALARS.pack(
                int(version),
                int(pos),
                int(has_gauss),
                0,
                float(cached),
                gauss is not None,
                0.0 if gauss is None else float(gauss),
            ),
            np.asarray(internal, dtype=np.uint32).tobytes(),
            np.asarray(key, dtype=np.uint32).tobytes(),
            torch.get_rng_state().numpy().tobytes(),
        ]
        for _, b in self.buffers:
            parts.append(
                b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            )
        out = b"".join(parts)
        assert len(out) == self.size
        return out

    def unpack(self, data: bytes) -> None:
        """Set the generators and the buffers from :meth:`pack`'s bytes."""
        if len(data) != self.size:
            raise StateMismatchError(
                f"a replica holds {len(data)} bytes of a process's own state, this model "
                f"packs {self.size}"
            )
        version, pos, has_gauss, _, cached, has_g, g = _SCALARS.unpack_from(data, 0)
        at = _SCALARS.size
        py = np.frombuffer(data, dtype=np.uint32, count=_PY_WORDS, offset=at)
        at += 4 * _PY_WORDS
        npk = np.frombuffer(data, dtype=np.uint32, count=_NP_WORDS, offset=at).copy()
        at += 4 * _NP_WORDS
        rng = torch.frombuffer(bytearray(data[at : at + self._torch_rng]), dtype=torch.uint8)
        at += self._torch_rng
        random.setstate((version, tuple(int(v) for v in py), g if has_g else None))
        np.random.set_state(("MT19937", npk, pos, has_gauss, cached))
        torch.set_rng_state(rng)
        with torch.no_grad():
            for _, b in self.buffers:
                n = b.numel() * b.element_size()
                src = torch.frombuffer(bytearray(data[at : at + n]), dtype=torch.uint8)
                if n:
                    b.view(-1).view(torch.uint8).copy_(src)
                at += n


def _ad(job: str, owner: int, step: int, layout: bytes) -> bytes:
    return aad("plinius replica v1", job, owner, step, layout)


def _key(key: MasterKey, job: str, salt: bytes) -> Aead:
    return key.aead("replica/" + job, salt)


def seal(key: MasterKey, job: str, owner: int, step: int, layout: bytes, plain: bytes) -> bytes:
    """Seal ``plain`` (a :meth:`UniquePart.pack`) as the replica of ``owner`` at ``step``.

    Returns:
        ``len(plain) + BLOB_OVERHEAD`` bytes.
    """
    salt = os.urandom(_SALT)
    return MAGIC + salt + _key(key, job, salt).encrypt(_NONCE, plain, _ad(job, owner, step, layout))


def open_sealed(
    key: MasterKey, job: str, owner: int, step: int, layout: bytes, blob: bytes, label: str
) -> bytes:
    """Authenticate and decrypt the replica of ``owner`` at ``step``.

    Args:
        label: how messages name the blob (where it was kept).

    Raises:
        IntegrityError: the blob was altered, belongs to another process, step,
            job or model, or is no replica.
    """
    if len(blob) < BLOB_OVERHEAD or blob[: len(MAGIC)] != MAGIC:
        raise IntegrityError(
            f"{label} is not a replica (no replica header): the mirror was tampered with; "
            "restore the set from a trusted copy"
        )
    salt = blob[len(MAGIC) : len(MAGIC) + _SALT]
    try:
        return _key(key, job, salt).decrypt(
            _NONCE, blob[len(MAGIC) + _SALT :], _ad(job, owner, step, layout)
        )
    except IntegrityError as exc:
        raise IntegrityError(
            f"{label} fails authentication as the replica of process rank {owner} at step "
            f"{step} of job {job}: it was altered, or it is another process's, step's or "
            "job's replica (swapped or replayed); restore the set from a trusted copy"
        ) from exc
