"""SealedDataset with torch's DataLoader: in process, forked workers, spawned workers."""

from __future__ import annotations

import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from plinius.crypto import MasterKey
from plinius.data import SealedDataset, SealedSampler, seal_dataset
from plinius.errors import ConfigError, IntegrityError

N = 300


@pytest.fixture(autouse=True)
def _private_tmpdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Worker processes leave multiprocessing's ``pymp-*`` directories behind (torch hands
    tensors over through a listener socket there, and a worker is ended without its exit
    handlers): keep them in a directory of this test's, removed afterwards."""
    d = tempfile.mkdtemp(prefix="plinius-test-mp-")
    monkeypatch.setenv("TMPDIR", d)  # spawned workers
    monkeypatch.setattr(tempfile, "tempdir", d)  # forked workers inherit the cached value
    try:
        yield
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "image": rng.integers(0, 256, size=(N, 6, 6), dtype=np.uint8),
        "label": np.arange(N, dtype=np.int64),
    }


@pytest.fixture
def path(shm_dir: Path, key: MasterKey, data: dict[str, np.ndarray]) -> Path:
    p = shm_dir / "d.pld"
    seal_dataset(p, key, data, chunk_records=16)
    return p


def _check(
    batches: list[list[torch.Tensor]], data: dict[str, np.ndarray], order: list[int]
) -> None:
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert labels.tolist() == order
    assert np.array_equal(images.numpy(), data["image"][order])


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_with_sampler(
    path: Path, key: MasterKey, data: dict[str, np.ndarray], workers: int
) -> None:
    with SealedDataset(path, key) as ds:
        sampler = SealedSampler(ds, seed=1, shuffle="full")
        order = list(sampler)
        loader = DataLoader(ds, batch_size=32, sampler=sampler, num_workers=workers)
        _check(list(loader), data, order)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_with_index_batches_like_the_trainer(
    path: Path, key: MasterKey, data: dict[str, np.ndarray], workers: int
) -> None:
    """batch_sampler lists: the fetcher calls __getitems__ (one decryption pass per batch)."""
    with SealedDataset(path, key) as ds:
        sampler = SealedSampler(ds, seed=2, shuffle="chunk")
        batches = list(sampler.batches(40, drop_last=True))
        loader = DataLoader(ds, batch_sampler=batches, num_workers=workers)
        _check(list(loader), data, [i for b in batches for i in b])


def test_dataloader_batched_fetch_through_getitem(
    path: Path, key: MasterKey, data: dict[str, np.ndarray]
) -> None:
    """batch_size=None with a BatchSampler: ds[list] is get_batch, no per-record collation."""
    with SealedDataset(path, key) as ds:
        sampler = SealedSampler(ds, seed=3, shuffle=False)
        loader = DataLoader(
            ds, sampler=BatchSampler(sampler, 50, drop_last=False), batch_size=None, num_workers=2
        )
        _check(list(loader), data, list(range(N)))


def test_tampering_is_reported_from_a_worker(path: Path, key: MasterKey) -> None:
    with SealedDataset(path, key) as ds:
        lay = ds._layout
        off = lay.field_offset(5, 0)
    raw = bytearray(path.read_bytes())
    raw[off + 3] ^= 1
    path.write_bytes(bytes(raw))
    with SealedDataset(path, key) as ds:
        loader = DataLoader(ds, batch_size=16, num_workers=2)
        with pytest.raises(IntegrityError, match="chunk 5"):
            list(loader)


def test_pickling_is_refused_outside_worker_start(path: Path, key: MasterKey) -> None:
    with SealedDataset(path, key) as ds:
        with pytest.raises(ConfigError, match="cannot be pickled"):
            pickle.dumps(ds)
        with pytest.raises(ConfigError, match="cannot be pickled"):
            torch.save(ds, path.with_suffix(".pt"))
        secrets = [ds._keys.header_key, *ds._keys.field_keys, key.raw_bytes()]
    written = path.with_suffix(".pt").read_bytes()  # torch.save's partial archive
    assert not any(s in written for s in secrets)


@pytest.mark.slow  # the spawned worker imports torch afresh
def test_dataloader_with_spawned_workers(
    path: Path, key: MasterKey, data: dict[str, np.ndarray]
) -> None:
    """Spawned workers get the dataset's derived keys when the DataLoader starts them."""
    with SealedDataset(path, key) as ds:
        order = list(range(N))
        loader = DataLoader(ds, batch_size=64, num_workers=1, multiprocessing_context="spawn")
        _check(list(loader), data, order)


def test_forked_child_reads_while_the_parent_holds_the_lock(
    path: Path, key: MasterKey, data: dict[str, np.ndarray]
) -> None:
    """A lock inherited through fork, held by a parent thread, must not block the child."""
    import os
    import signal
    import threading
    import time
    import warnings

    with SealedDataset(path, key) as ds:
        ds[0]  # the parent has read (its pid is recorded, its cache filled)
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with ds._lock:
                held.set()
                release.wait(10)

        t = threading.Thread(target=hold)
        t.start()
        held.wait(10)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    code = 0 if int(ds[N - 1][1]) == N - 1 else 2
                finally:
                    os._exit(code)
            status = None
            for _ in range(400):  # a deadlocked child must fail the test, not hang it
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child deadlocked on the inherited lock")
        finally:
            release.set()
            t.join()
        assert os.waitstatus_to_exitcode(status) == 0
