"""ResumableLoader: the order, the position the loop really consumed, its state, and a
hand-written loop (dropout, workers, OneCycleLR, clipping, bf16 autocast, random
augmentation) that resumes bit for bit from the mirror."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from plinius import ResumableLoader, RNGState
from plinius.crypto import MasterKey
from plinius.data import SealedDataset, SealedSampler, seal_dataset
from plinius.errors import ConfigError, StateMismatchError
from plinius.mirror import Mirror

N = 203


@pytest.fixture(autouse=True)
def _private_tmpdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the workers' multiprocessing directories in a directory removed afterwards."""
    d = tempfile.mkdtemp(prefix="plinius-test-mp-")
    monkeypatch.setenv("TMPDIR", d)
    monkeypatch.setattr(tempfile, "tempdir", d)
    try:
        yield
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 255, size=(N, 4, 4), dtype=np.uint8)
    return x, np.arange(N, dtype=np.int64)


@pytest.fixture
def sealed(shm_dir: Path, key: MasterKey) -> Iterator[SealedDataset]:
    x, y = _arrays()
    seal_dataset(shm_dir / "d.pld", key, {"x": x, "y": y}, chunk_records=16)
    with SealedDataset(shm_dir / "d.pld", key) as ds:
        yield ds


class _Noisy(TensorDataset):
    """Random augmentation in __getitem__, from the (worker's) global generator."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x, y = super().__getitem__(i)
        return x.float() + 40.0 * torch.rand(x.shape), y % 4


def _noisy() -> _Noisy:
    x, y = _arrays()
    return _Noisy(torch.from_numpy(x), torch.from_numpy(y))


def _labels(batches: list[tuple[torch.Tensor, ...]]) -> list[int]:
    return [int(v) for b in batches for v in b[-1]]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_is_the_samplers_order_then_the_next_epoch(
    sealed: SealedDataset, workers: int
) -> None:
    loader = ResumableLoader(sealed, batch_size=32, seed=4, num_workers=workers)
    sampler = SealedSampler(sealed, seed=4)
    assert len(loader) == 7  # 203 = 6 * 32 + 11
    first = list(loader)
    assert [len(b[0]) for b in first] == [32] * 6 + [11]
    assert _labels(first) == list(sampler)
    assert (loader.epoch, loader.consumed) == (1, 0)
    sampler.set_epoch(1)
    assert _labels(list(loader)) == list(sampler) != _labels(first)

    dropping = ResumableLoader(sealed, batch_size=32, seed=4, drop_last=True)
    assert len(dropping) == 6
    assert [len(b[0]) for b in dropping] == [32] * 6


@pytest.mark.parametrize("workers", [0, 2])
def test_the_position_is_what_the_loop_received_not_what_workers_fetched(
    sealed: SealedDataset, workers: int
) -> None:
    loader = ResumableLoader(sealed, batch_size=32, seed=1, shuffle="full", num_workers=workers)
    whole = _labels(list(ResumableLoader(sealed, batch_size=32, seed=1, shuffle="full")))
    got: list[tuple[torch.Tensor, ...]] = []
    for batch in loader:
        got.append(batch)
        if len(got) == 2:
            break  # the workers have fetched further ahead by now
    assert loader.consumed == 64
    saved = loader.state_dict()
    got += list(loader)  # iterating again continues where the loop stopped
    assert _labels(got) == whole
    other = ResumableLoader(sealed, batch_size=32, seed=1, shuffle="full", num_workers=workers)
    other.load_state_dict(saved)
    assert _labels(list(other)) == whole[64:]


def test_a_restore_in_the_middle_of_an_iteration_is_followed(sealed: SealedDataset) -> None:
    loader = ResumableLoader(sealed, batch_size=32, seed=2)
    whole = _labels(list(ResumableLoader(sealed, batch_size=32, seed=2)))
    it = iter(loader)
    next(it)
    saved = loader.state_dict()
    next(it)
    next(it)
    loader.load_state_dict(saved)
    assert _labels(list(it)) == whole[32:]


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_never_draws_from_torchs_global_generator(workers: int) -> None:
    x, y = _arrays()
    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    before = torch.get_rng_state()
    for _ in ResumableLoader(ds, batch_size=50, seed=0, num_workers=workers):
        pass
    assert torch.equal(torch.get_rng_state(), before)
    # What it replaces: each iter() of a DataLoader draws a seed from it.
    next(iter(DataLoader(ds, batch_size=50, num_workers=0)))
    assert not torch.equal(torch.get_rng_state(), before)


def test_state_of_another_job_is_refused_and_changes_nothing(sealed: SealedDataset) -> None:
    loader = ResumableLoader(sealed, batch_size=32, seed=0)
    it = iter(loader)
    next(it)
    saved = loader.state_dict()
    for kwargs, needle in [
        ({"batch_size": 16}, "batch_size=32"),
        ({"batch_size": 32, "drop_last": True}, "drop_last=False"),
        ({"batch_size": 32, "shuffle": "full"}, "shuffle"),
    ]:
        other = ResumableLoader(sealed, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(StateMismatchError, match=needle):
            other.load_state_dict(saved)
        assert (other.epoch, other.consumed) == (0, 0)
    with pytest.raises(StateMismatchError, match="not a ResumableLoader state"):
        loader.load_state_dict({"version": 2})
    assert loader.consumed == 32


def test_bad_arguments(sealed: SealedDataset) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        ResumableLoader(sealed, batch_size=0)
    with pytest.raises(ConfigError, match="num_workers"):
        ResumableLoader(sealed, batch_size=8, num_workers=-1)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        ResumableLoader(sealed, batch_size=N + 1, drop_last=True)
    with pytest.raises(ConfigError, match="map-style dataset"):
        ResumableLoader(iter(range(3)), batch_size=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed"):
        ResumableLoader(sealed, batch_size=8, seed=-1)
    loader = ResumableLoader(sealed, batch_size=N + 1)  # one short batch per epoch
    assert len(loader) == 1 and [len(b[0]) for b in loader] == [N]


def test_a_dataloader_in_the_state_is_refused_naming_the_loader(
    shm_dir: Path, key: MasterKey
) -> None:
    x, y = _arrays()
    dl = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=8)
    with Mirror(shm_dir / "m.plm", key) as m:
        with pytest.raises(ConfigError, match="cannot save data: a torch DataLoader") as exc:
            m.save({"data": dl}, step=1)
        assert "plinius.ResumableLoader" in str(exc.value)
        assert "\n" not in str(exc.value)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _user_loop(mirror: Mirror, workers: int, *, stop_after: int | None = None) -> dict[str, Any]:
    """The loop of issue 18's new user: dropout, workers, OneCycleLR, clipping, bf16 autocast.

    ``stop_after`` abandons the process's objects after that many steps this
    call ran, as a crash would (the state after the last save is in the mirror).
    """
    torch.manual_seed(0)
    loader = ResumableLoader(_noisy(), batch_size=16, seed=7, num_workers=workers)
    model = _Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    epochs = 2
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.05, total_steps=epochs * len(loader)
    )
    state = {"model": model, "optim": optimizer, "sched": scheduler, "rng": RNGState(),
             "data": loader}  # fmt: skip
    step = mirror.restore(state) or 0
    ran = 0
    losses: list[float] = []
    while loader.epoch < epochs:
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x / 255), y)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            scheduler.step()
            step += 1
            mirror.save(state, step=step)
            losses.append(float(loss.detach()))
            ran += 1
            if ran == stop_after:
                return {}
    return {
        "step": step,
        "model": [_bits(t) for t in model.state_dict().values()],
        "optim": [_bits(t) for s in optimizer.state_dict()["state"].values() for t in s.values()],
        "sched": scheduler.state_dict()["last_epoch"],
        "torch_rng": _bits(torch.get_rng_state()),
        "data": loader.state_dict(),
        "last_loss": losses[-1],
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_a_hand_written_loop_resumes_bit_for_bit(
    shm_dir: Path, key: MasterKey, workers: int
) -> None:
    with Mirror(shm_dir / "straight.plm", key) as m:
        straight = _user_loop(m, workers)
    assert straight["step"] == 2 * 13
    stops = [5, 11, 2]  # mid-epoch, across the epoch boundary (13 batches), mid-epoch
    for stop in stops:
        with Mirror(shm_dir / "crashed.plm", key) as m:
            assert _user_loop(m, workers, stop_after=stop) == {}
    with Mirror(shm_dir / "crashed.plm", key) as m:
        assert m.info().step == sum(stops)
        resumed = _user_loop(m, workers)
    assert resumed == straight
