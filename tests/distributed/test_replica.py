"""Replica blobs attacked: flipped, moved to another owner's slot, replayed from another step."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from plinius.crypto import MasterKey
from plinius.errors import IntegrityError
from plinius.replica import BLOB_OVERHEAD, UniquePart, open_sealed, seal


def _part() -> UniquePart:
    return UniquePart(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))


def test_a_replica_brings_back_the_generators_and_buffers() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    part = UniquePart(net)
    key = MasterKey.generate()
    torch.manual_seed(3)
    random.seed(5)
    net(torch.randn(8, 4))  # the BatchNorm statistics move
    blob = seal(key, "job", 1, 7, part.layout, part.pack())
    assert len(blob) == part.size + BLOB_OVERHEAD
    want = (torch.rand(3), random.random(), net[1].running_mean.clone())
    net(torch.randn(8, 4))
    part.unpack(open_sealed(key, "job", 1, 7, part.layout, blob, "the blob"))
    got = (torch.rand(3), random.random(), net[1].running_mean.clone())
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and torch.equal(got[2], want[2])


def test_flipped_swapped_replayed_or_foreign_replicas_are_refused() -> None:
    part, key = _part(), MasterKey.generate()
    blob = seal(key, "job", 1, 7, part.layout, part.pack())
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    with pytest.raises(IntegrityError, match="the blob fails authentication"):
        open_sealed(key, "job", 1, 7, part.layout, bytes(flipped), "the blob")
    with pytest.raises(IntegrityError, match="replica of process rank 0 at step 7"):
        open_sealed(key, "job", 0, 7, part.layout, blob, "the blob")  # another owner's slot
    with pytest.raises(IntegrityError, match="rank 1 at step 8"):
        open_sealed(key, "job", 1, 8, part.layout, blob, "the blob")  # replayed at step 8
    with pytest.raises(IntegrityError, match="of job other"):
        open_sealed(key, "other", 1, 7, part.layout, blob, "the blob")
    other = UniquePart(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(5)))
    with pytest.raises(IntegrityError):
        open_sealed(key, "job", 1, 7, other.layout, blob, "the blob")  # another model
    with pytest.raises(IntegrityError):
        open_sealed(MasterKey.generate(), "job", 1, 7, part.layout, blob, "the blob")
    with pytest.raises(IntegrityError, match="not a replica"):
        open_sealed(key, "job", 1, 7, part.layout, blob[:10], "the blob")
    # a fresh salt per blob: two seals of the same bytes differ
    assert seal(key, "job", 1, 7, part.layout, part.pack()) != blob
