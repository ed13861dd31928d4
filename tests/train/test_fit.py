"""The training loop: exact resume (in-process interruption), data paths, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from plinius.crypto import MasterKey
from plinius.data import SealedDataset, seal_dataset
from plinius.errors import ConfigError, StateMismatchError
from plinius.mirror import Mirror
from plinius.train import StepEvent, evaluate, fit, seed_everything


class _Net(nn.Module):
    """Small, but with everything exactness depends on: BatchNorm buffers and dropout RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(32, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _data(n: int = 203) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 255, size=(n, 4, 4), dtype=np.uint8)
    y = (x.reshape(n, -1).sum(axis=1) % 4).astype(np.int64)
    return x, y


def _prepare(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


class _Crash(Exception):
    pass


def _job(
    mirror: Mirror | None,
    dataset: Any,
    *,
    steps: int,
    crash_at: int | None = None,
    init_seed: int = 0,
    optim: str = "sgd",
    num_workers: int = 0,
    shuffle: Any = "chunk",
) -> tuple[nn.Module, torch.optim.Optimizer, Any, list[float]]:
    seed_everything(init_seed)
    model = _Net()
    opt: torch.optim.Optimizer
    if optim == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)

    def cb(ev: StepEvent) -> None:
        if crash_at is not None and ev.step == crash_at:
            raise _Crash

    try:
        res = fit(
            model,
            opt,
            loss_fn=nn.functional.cross_entropy,
            dataset=dataset,
            batch_size=16,
            steps=steps,
            seed=3,
            mirror=mirror,
            scheduler=sched,
            prepare=_prepare,
            callback=cb,
            num_workers=num_workers,
            shuffle=shuffle,
        )
        losses = res.losses
    except _Crash:
        losses = []
    return model, opt, sched, losses


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    ma, oa, sa, la = a
    mb, ob, sb, lb = b
    for (na, ta), (nb, tb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb
        assert _bits(ta) == _bits(tb), na
    sda, sdb = oa.state_dict(), ob.state_dict()
    assert sda["param_groups"] == sdb["param_groups"]
    for k in sda["state"]:
        for name, v in sda["state"][k].items():
            w = sdb["state"][k][name]
            if isinstance(v, torch.Tensor):
                assert _bits(v) == _bits(w), (k, name)
            else:
                assert v == w
    assert sa.state_dict() == sb.state_dict()
    assert np.array(la).tobytes() == np.array(lb).tobytes()


@pytest.fixture
def sealed(shm_dir: Path, key: MasterKey) -> SealedDataset:
    x, y = _data()
    path = shm_dir / "d.pld"
    seal_dataset(path, key, {"x": x, "y": y}, chunk_records=32)
    return SealedDataset(path, key)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_interrupted_job_equals_uninterrupted(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset, optim: str
) -> None:
    steps = 30  # crosses an epoch boundary (203 // 16 = 12 batches per epoch)
    with Mirror(shm_dir / "a.plm", key) as m:
        straight = _job(m, sealed, steps=steps, optim=optim)
    with Mirror(shm_dir / "b.plm", key) as m:
        _job(m, sealed, steps=steps, crash_at=11, optim=optim)
    with Mirror(shm_dir / "b.plm", key) as m:
        _job(m, sealed, steps=steps, crash_at=17, init_seed=99, optim=optim)
    with Mirror(shm_dir / "b.plm", key) as m:
        # A different init proves the restore overwrote everything.
        resumed = _job(m, sealed, steps=steps, init_seed=123, optim=optim)
    assert len(straight[3]) == steps
    assert all(np.isfinite(straight[3]))
    _assert_same(straight, resumed)


def test_resume_reports_where(shm_dir: Path, key: MasterKey, sealed: SealedDataset) -> None:
    with Mirror(shm_dir / "a.plm", key) as m:
        _job(m, sealed, steps=20, crash_at=7)
    seed_everything(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    seen: list[tuple[int | None, float]] = []
    with Mirror(shm_dir / "a.plm", key) as m:
        res = fit(
            model, opt, loss_fn=nn.functional.cross_entropy, dataset=sealed, batch_size=16,
            steps=20, seed=3, mirror=m, scheduler=sched, prepare=_prepare,
            on_resume=lambda s, t: seen.append((s, t)),
        )  # fmt: skip
    assert res.resumed_from == 7
    assert res.steps_run == 13
    assert seen and seen[0][0] == 7 and seen[0][1] >= 0
    assert len(res.losses) == 20 and all(np.isfinite(res.losses))


def test_plain_dataset_and_workers_give_the_same_result(sealed: SealedDataset) -> None:
    x, y = _data()
    plain = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    # The uniform shuffle does not depend on how the sealed file is chunked.
    a = _job(None, plain, steps=14, shuffle="full")
    b = _job(None, sealed, steps=14, shuffle="full")
    c = _job(None, sealed, steps=14, shuffle="full", num_workers=2)
    _assert_same(a, b)
    _assert_same(b, c)


def test_mirror_of_another_job_is_refused(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset
) -> None:
    with Mirror(shm_dir / "a.plm", key) as m:
        _job(m, sealed, steps=10)
    # More steps continue the job (tests/train/test_extend.py); fewer than it did are refused.
    with Mirror(shm_dir / "a.plm", key) as m, pytest.raises(StateMismatchError, match="already"):
        _job(m, sealed, steps=8)


def test_bad_arguments(sealed: SealedDataset) -> None:
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ce = nn.functional.cross_entropy
    with pytest.raises(ConfigError, match="fewer than one batch"):
        fit(model, opt, loss_fn=ce, dataset=sealed, batch_size=1000, steps=1)
    with pytest.raises(ConfigError, match="exactly one"):
        fit(model, opt, loss_fn=ce, dataset=sealed, batch_size=8)
    with pytest.raises(ConfigError):
        fit(model, opt, loss_fn=ce, dataset=sealed, batch_size=0, steps=1)
    with pytest.raises(ConfigError):
        fit(model, opt, loss_fn=ce, dataset=sealed, batch_size=8, steps=1, mirror_every=0)


def test_epochs_and_evaluate(sealed: SealedDataset) -> None:
    seed_everything(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    res = fit(
        model, opt, loss_fn=nn.functional.cross_entropy, dataset=sealed, batch_size=16,
        epochs=2, prepare=_prepare,
    )  # fmt: skip
    assert res.final_step == 2 * (len(sealed) // 16)
    acc, loss = evaluate(model, sealed, loss_fn=nn.functional.cross_entropy, prepare=_prepare)
    assert 0.0 <= acc <= 1.0 and np.isfinite(loss)


def test_resume_on_another_dataset_is_refused(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset
) -> None:
    """Same shape, same key, another dataset: a resumed job must not silently switch."""
    from plinius.errors import IntegrityError

    x, y = _data()
    other = shm_dir / "other.pld"
    seal_dataset(other, key, {"x": x, "y": y}, chunk_records=32)
    with Mirror(shm_dir / "a.plm", key) as m:
        _job(m, sealed, steps=10, crash_at=4)
    with (
        SealedDataset(other, key) as ds,
        Mirror(shm_dir / "a.plm", key) as m,
        pytest.raises(IntegrityError, match="trained on dataset"),
    ):
        _job(m, ds, steps=10)


def test_resume_with_other_settings_is_refused(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset
) -> None:
    """Another batch size (or seed, shuffle) would silently compute a third job: refused."""
    with Mirror(shm_dir / "a.plm", key) as m:
        _job(m, sealed, steps=10, crash_at=4)
    seed_everything(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    with Mirror(shm_dir / "a.plm", key) as m, pytest.raises(StateMismatchError, match="batch_size"):
        fit(
            model, opt, loss_fn=nn.functional.cross_entropy, dataset=sealed, batch_size=8,
            steps=10, seed=3, mirror=m, scheduler=sched, prepare=_prepare,
        )  # fmt: skip


class _Noisy(TensorDataset):
    """Random augmentation in __getitem__: the case where workers could break exactness."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x, y = super().__getitem__(i)
        return x.float() + 40.0 * torch.rand(x.shape), y


@pytest.mark.parametrize("workers", [0, 2])
def test_random_augmentation_resumes_exactly(shm_dir: Path, key: MasterKey, workers: int) -> None:
    x, y = _data()
    ds = _Noisy(torch.from_numpy(x), torch.from_numpy(y))
    with Mirror(shm_dir / "a.plm", key) as m:
        straight = _job(m, ds, steps=18, num_workers=workers)
    with Mirror(shm_dir / "b.plm", key) as m:
        _job(m, ds, steps=18, crash_at=5, num_workers=workers)  # mid-epoch (12 batches)
    with Mirror(shm_dir / "b.plm", key) as m:
        resumed = _job(m, ds, steps=18, init_seed=5, num_workers=workers)
    _assert_same(straight, resumed)


def test_reduce_lr_on_plateau_steps_on_the_loss(shm_dir: Path, sealed: SealedDataset) -> None:
    seed_everything(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    key = MasterKey.generate()
    with Mirror(shm_dir / "p.plm", key) as m:
        res = fit(
            model, opt, loss_fn=nn.functional.cross_entropy, dataset=sealed, batch_size=16,
            steps=8, mirror=m, scheduler=sched, prepare=_prepare,
        )  # fmt: skip
    assert len(res.losses) == 8
    assert sched.num_bad_epochs >= 0 and opt.param_groups[0]["lr"] <= 0.05
