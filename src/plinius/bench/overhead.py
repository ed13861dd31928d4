"""Mirroring overhead per iteration: no mirror, synchronous, asynchronous.

The real training loop (:func:`plinius.fit`) trains the reference CNN at batch
128 on a sealed synthetic MNIST-shaped dataset three ways: without a mirror,
mirroring every iteration with ``save`` (the iteration waits for the commit),
and every iteration with ``save_async`` (the save overlaps the next forward and
backward pass and is joined before the next ``optimizer.step()``). The three
modes run in turn, round after round (the order rotating), each on a fresh
model and mirror with the same seed. Per-step times come from ``FitResult.step_times_s``; the first
two steps (warm-up, the mirror's first layout) and the last one (always a
synchronous save) are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..crypto import MasterKey
from ._common import BenchConfig, Progress, collect, median

__all__ = ["MODES", "run_overhead", "synthetic_mnist"]

MODES = ("none", "sync", "async")


def synthetic_mnist(records: int, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    """Random 28x28 uint8 images and labels 0..9: MNIST's shapes, dtypes and size."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, size=(records, 28, 28), dtype=np.uint8),
        "label": rng.integers(0, 10, size=(records,), dtype=np.int64),
    }


def _fit_once(
    cfg: BenchConfig, key: MasterKey, data: Path, mirror_path: Path, mode: str
) -> dict[str, Any]:
    from ..data import SealedDataset
    from ..mirror import Mirror
    from ..models import build_model
    from ..train import fit, seed_everything

    seed_everything(0)
    spec = build_model(cfg.overhead_model, input_shape=(28, 28), num_classes=10)
    opt = spec.make_optimizer(None)
    steps = cfg.overhead_steps + 3
    sched = spec.make_scheduler(opt, steps)
    mirror_path.unlink(missing_ok=True)
    mirror = Mirror(mirror_path, key) if mode != "none" else None
    try:
        with SealedDataset(data, key) as ds:
            res = fit(
                spec.module,
                opt,
                loss_fn=spec.loss,
                dataset=ds,
                batch_size=cfg.overhead_batch,
                steps=steps,
                seed=0,
                mirror=mirror,
                scheduler=sched,
                async_save=mode == "async",
                prepare=spec.prepare,
                split=spec.split,
            )
        state_bytes = int(mirror.info().tensor_bytes) if mirror is not None else 0
    finally:
        if mirror is not None:
            mirror.close()
        mirror_path.unlink(missing_ok=True)
    return {
        "step_s": list(res.step_times_s[2:-1]),
        "save_wait_s": res.save_wait_s,
        "state_bytes": state_bytes,
        "param_bytes": spec.param_bytes(),
    }


def run_overhead(cfg: BenchConfig, key: MasterKey, pm: Path, progress: Progress) -> dict[str, Any]:
    """Median iteration time per mode and the overhead of mirroring against no mirror."""
    from ..data import seal_dataset

    records = cfg.overhead_batch * (cfg.overhead_steps + 4)
    data = pm / "overhead.pld"
    mirror_path = pm / "overhead.plm"
    seal_dataset(data, key, synthetic_mnist(records))
    steps: dict[str, list[float]] = {m: [] for m in MODES}
    waits: dict[str, list[float]] = {m: [] for m in MODES}
    state_bytes = param_bytes = 0
    try:
        with progress.section("overhead", cfg.overhead_rounds * len(MODES)) as advance:
            for rnd in range(cfg.overhead_rounds):
                # Rotate the order each round, so no mode always runs first or last.
                for mode in MODES[rnd % 3 :] + MODES[: rnd % 3]:
                    r = _fit_once(cfg, key, data, mirror_path, mode)
                    steps[mode] += r["step_s"]
                    waits[mode].append(r["save_wait_s"])
                    state_bytes = max(state_bytes, r["state_bytes"])
                    param_bytes = r["param_bytes"]
                    collect()
                    advance(f"round {rnd + 1}: {mode}")
    finally:
        data.unlink(missing_ok=True)
        mirror_path.unlink(missing_ok=True)
    med = {m: median(steps[m]) for m in MODES}
    base = med["none"]
    overhead = {m: 100.0 * (med[m] / base - 1.0) for m in ("sync", "async")}
    save_cost = med["sync"] - base
    hidden = (med["sync"] - med["async"]) / save_cost if save_cost > 0 else float("nan")
    if not (-0.1 <= hidden <= 1.1):
        hidden = float("nan")  # the noise exceeds the save's cost: no meaningful share
    return {
        "model": cfg.overhead_model,
        "batch": cfg.overhead_batch,
        "param_bytes": param_bytes,
        "state_bytes": state_bytes,
        "rounds": cfg.overhead_rounds,
        "steps_per_round": cfg.overhead_steps,
        "iteration_s": med,
        "iteration_runs_s": steps,
        "overhead_pct": overhead,
        "save_in_iteration_s": save_cost,
        "async_hidden_fraction": hidden,
        "async_wait_s_per_run": waits["async"],
        "target": "mirroring every iteration adds at most 5%",
        "target_pct": 5.0,
    }
