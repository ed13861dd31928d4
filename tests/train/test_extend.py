"""Jobs that live longer than one run: raising (or lowering) ``steps`` on a mirror, fine-tuning."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from plinius.crypto import MasterKey
from plinius.data import SealedDataset, seal_dataset
from plinius.errors import ConfigError, StateMismatchError
from plinius.mirror import Mirror
from plinius.train import FitResult, StepEvent, fit, seed_everything
from tests.train.test_fit import _assert_same as _assert_same_with_scheduler
from tests.train.test_fit import _bits, _Crash, _data, _Net, _prepare

Job = tuple[nn.Module, torch.optim.Optimizer, Any, list[float]]


def _sched(kind: str, opt: torch.optim.Optimizer, total: int) -> Any:
    lrs = torch.optim.lr_scheduler
    if kind == "step":
        return lrs.StepLR(opt, step_size=5, gamma=0.7)
    if kind == "lambda-const":
        return lrs.LambdaLR(opt, lambda s: 0.5 if s >= 7 else 1.0)
    if kind == "poly":  # Darknet's poly: depends on the job's total
        return lrs.LambdaLR(opt, lambda s: (1 - s / total) ** 4)
    if kind == "onecycle":
        return lrs.OneCycleLR(opt, max_lr=0.1, total_steps=total)
    if kind == "cosine":
        return lrs.CosineAnnealingLR(opt, T_max=total)
    if kind == "multiplicative":  # its plan is a lambda: nothing in its state changes
        return lrs.MultiplicativeLR(opt, lambda s: 0.97)
    assert kind == "none"
    return None


def _run(
    mirror: Mirror | None,
    ds: Any,
    *,
    steps: int,
    sched: str,
    crash_at: int | None = None,
    init_seed: int = 0,
    seen: list[Any] | None = None,
) -> tuple[Job, FitResult | None]:
    seed_everything(init_seed)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = _sched(sched, opt, steps)

    def cb(ev: StepEvent) -> None:
        if seen is not None:
            seen.append(ev)
        if crash_at is not None and ev.step == crash_at:
            raise _Crash

    res: FitResult | None = None
    try:
        res = fit(
            model, opt, loss_fn=nn.functional.cross_entropy, dataset=ds, batch_size=16,
            steps=steps, seed=3, mirror=mirror, scheduler=scheduler, prepare=_prepare,
            callback=cb, on_replan=seen.append if seen is not None else None,
        )  # fmt: skip
    except _Crash:
        pass
    return (model, opt, scheduler, res.losses if res else []), res


class _NoScheduler:
    def state_dict(self) -> dict[str, Any]:
        return {}


def _assert_same(a: Job, b: Job) -> None:
    """Model, optimizer, scheduler and losses bit for bit (no scheduler on either side too)."""
    assert (a[2] is None) == (b[2] is None)
    _assert_same_with_scheduler(
        (a[0], a[1], a[2] or _NoScheduler(), a[3]), (b[0], b[1], b[2] or _NoScheduler(), b[3])
    )


@pytest.fixture
def sealed(shm_dir: Path, key: MasterKey) -> SealedDataset:
    x, y = _data()
    path = shm_dir / "d.pld"
    seal_dataset(path, key, {"x": x, "y": y}, chunk_records=32)
    return SealedDataset(path, key)


@pytest.mark.parametrize("sched", ["none", "step", "lambda-const", "multiplicative"])
def test_extending_a_job_whose_schedule_ignores_its_length_equals_the_longer_job(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset, sched: str
) -> None:
    """12 steps, then steps=20 on the same mirror: bit for bit the uninterrupted 20-step job."""
    straight, _ = _run(None, sealed, steps=20, sched=sched)
    with Mirror(shm_dir / "a.plm", key) as m:
        first, _ = _run(m, sealed, steps=12, sched=sched)
    seen: list[Any] = []
    with Mirror(shm_dir / "a.plm", key) as m:
        extended, res = _run(m, sealed, steps=20, sched=sched, init_seed=77, seen=seen)
    assert res is not None and res.replanned_from == 12 and res.resumed_from == 12
    assert res.steps_run == 8 and res.final_step == 20 and len(res.losses) == 20
    assert first[3] == straight[3][:12]
    _assert_same(straight, extended)
    said = [s for s in seen if isinstance(s, str)]
    assert len(said) == 1 and said[0].startswith("the job was 12 steps, now 20: it continues after")
    with Mirror(shm_dir / "a.plm", key) as m:  # the mirror now holds the 20-step job
        again, res = _run(m, sealed, steps=20, sched=sched)
    assert res is not None and res.replanned_from is None and res.steps_run == 0
    _assert_same(straight, again)


@pytest.mark.parametrize("sched", ["poly", "onecycle", "cosine"])
def test_extending_re_plans_a_schedule_that_depends_on_the_length(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset, sched: str
) -> None:
    """Steps 13..20 get the rates of the 20-step plan; the result is not the 20-step job's."""
    seen_straight: list[Any] = []
    straight, _ = _run(None, sealed, steps=20, sched=sched, seen=seen_straight)
    with Mirror(shm_dir / "a.plm", key) as m:
        first, _ = _run(m, sealed, steps=12, sched=sched)
    seen: list[Any] = []
    with Mirror(shm_dir / "a.plm", key) as m:
        extended, res = _run(m, sealed, steps=20, sched=sched, seen=seen)
    assert res is not None and res.replanned_from == 12
    said = [s for s in seen if isinstance(s, str)]
    name = type(extended[2]).__name__
    assert said == [
        f"the job was 12 steps, now 20: it continues after step 12; the {name} schedule is "
        "re-planned for 20 steps"
    ]
    assert extended[3][:12] == first[3]  # the 12 steps are the 12-step job's
    # Each extended step ran at the rate the 20-step plan gives that step: the rate
    # in force during step k is the one reported after step k - 1.
    lr_after = {ev.step: ev.lr for ev in seen_straight}
    ext = [ev for ev in seen if isinstance(ev, StepEvent)]
    assert [ev.step for ev in ext] == list(range(13, 21))
    want = [lr_after[k] for k in range(13, 21)]
    if sched == "cosine":
        # Its rates step by step are chained products; re-planned they start from
        # the closed form: equal up to rounding, not bit for bit.
        assert [ev.lr for ev in ext] == pytest.approx(want, rel=1e-12, abs=1e-15)
    else:
        assert [ev.lr for ev in ext] == want
        assert extended[1].param_groups[0]["lr"] == straight[1].param_groups[0]["lr"]
    # What is promised is the re-planned continuation, not the 20-step job.
    assert extended[3][12:] != straight[3][12:]
    assert all(math.isfinite(v) for v in extended[3])


def test_a_crash_in_the_extended_part_resumes_exactly(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset
) -> None:
    with Mirror(shm_dir / "a.plm", key) as m:
        _run(m, sealed, steps=12, sched="poly")
    with Mirror(shm_dir / "a.plm", key) as m:
        straight, _ = _run(m, sealed, steps=20, sched="poly")
    with Mirror(shm_dir / "b.plm", key) as m:
        _run(m, sealed, steps=12, sched="poly")
    with Mirror(shm_dir / "b.plm", key) as m:
        _run(m, sealed, steps=20, sched="poly", crash_at=16)
    with Mirror(shm_dir / "b.plm", key) as m:
        resumed, res = _run(m, sealed, steps=20, sched="poly", init_seed=9)
    assert res is not None and res.resumed_from == 16 and res.replanned_from is None
    _assert_same(straight, resumed)


def test_fewer_steps_than_the_mirror_did_is_refused_and_changes_nothing(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset
) -> None:
    path = shm_dir / "a.plm"
    with Mirror(path, key) as m:
        _run(m, sealed, steps=12, sched="poly")
    before = hashlib.sha256(path.read_bytes()).digest()
    with (
        Mirror(path, key) as m,
        pytest.raises(StateMismatchError, match=r"already did 12 steps of its 12-step job"),
    ):
        _run(m, sealed, steps=8, sched="poly")
    assert hashlib.sha256(path.read_bytes()).digest() == before


def test_an_unfinished_job_can_be_shortened_down_to_the_steps_it_did(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset
) -> None:
    with Mirror(shm_dir / "a.plm", key) as m:
        _run(m, sealed, steps=12, sched="step", crash_at=6)
    with Mirror(shm_dir / "a.plm", key) as m:
        done, res = _run(m, sealed, steps=6, sched="step")
    assert res is not None and res.steps_run == 0 and res.replanned_from == 12
    assert len(res.losses) == 6 and all(math.isfinite(v) for v in res.losses)
    with Mirror(shm_dir / "a.plm", key) as m:  # the new total was recorded
        _, res = _run(m, sealed, steps=6, sched="step")
    assert res is not None and res.replanned_from is None and res.resumed_from == 6
    straight, _ = _run(None, sealed, steps=6, sched="step")
    assert done[3] == straight[3]


def test_a_schedule_that_cannot_be_re_planned_is_a_clear_error(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset
) -> None:
    class _Cyclic(torch.optim.lr_scheduler.LRScheduler):
        """A chainable schedule with its length in its state and no closed form."""

        def __init__(self, opt: torch.optim.Optimizer, total: int) -> None:
            self.total = total
            super().__init__(opt)

        def get_lr(self) -> list[float]:  # type: ignore[override]
            return [g["lr"] * (0.9 if self.last_epoch % self.total else 1.0)
                    for g in self.optimizer.param_groups]  # fmt: skip

    def job(m: Mirror, steps: int) -> None:
        seed_everything(0)
        model = _Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        fit(
            model, opt, loss_fn=nn.functional.cross_entropy, dataset=sealed, batch_size=16,
            steps=steps, seed=3, mirror=m, scheduler=_Cyclic(opt, steps), prepare=_prepare,
        )  # fmt: skip

    with Mirror(shm_dir / "a.plm", key) as m:
        job(m, 6)
    with Mirror(shm_dir / "a.plm", key) as m, pytest.raises(ConfigError) as err:
        job(m, 8)
    assert "_Cyclic schedule was planned for another number of steps" in str(err.value)
    assert "\n" not in str(err.value)
    with Mirror(shm_dir / "a.plm", key) as m:
        assert m.info().step == 6


def test_fine_tuning_starts_from_another_mirrors_model_only(
    shm_dir: Path, key: MasterKey, sealed: SealedDataset
) -> None:
    """The documented way: Mirror(old, key, readonly=True).restore_model(model), then a new job."""
    old = shm_dir / "old.plm"
    with Mirror(old, key) as m:
        trained, _ = _run(m, sealed, steps=12, sched="step")
    before = hashlib.sha256(old.read_bytes()).digest()
    seed_everything(5)
    model = _Net()
    with Mirror(old, key, readonly=True) as m:
        assert m.restore_model(model) == 12
    for (n, a), (_, b) in zip(model.state_dict().items(), trained[0].state_dict().items()):
        assert _bits(a) == _bits(b), n
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # its own fresh optimizer
    with Mirror(shm_dir / "new.plm", key) as m:
        res = fit(
            model, opt, loss_fn=nn.functional.cross_entropy, dataset=sealed, batch_size=16,
            steps=4, seed=3, mirror=m, prepare=_prepare,
        )  # fmt: skip
    assert res.resumed_from is None and res.final_step == 4 and res.steps_run == 4
    assert all(np.isfinite(res.losses))
    assert hashlib.sha256(old.read_bytes()).digest() == before
