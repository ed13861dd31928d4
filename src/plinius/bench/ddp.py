"""Mirroring under DistributedDataParallel: what it costs per iteration, with N processes.

One torchrun job per process count (``python -m torch.distributed.run
--standalone --nproc-per-node N -m plinius.bench.ddp``) trains the reference
CNN with :func:`plinius.fit` in DDP, on a sealed synthetic MNIST-shaped
dataset, the global batch split between the processes, three ways, round after
round (the order rotating), each on a fresh model with the same seed:

- ``none``: DDP with its own all-reduce, no mirror;
- ``mirror``: the same, each process mirroring its state to its file of a
  mirror set every iteration (asynchronously, as ``plinius train`` does);
- ``ordered``: no mirror, the gradients reduced by
  :func:`plinius.dist.ordered_allreduce_hook` (all-gather, then added in rank
  order: exact on resume; ``plinius train`` uses it from 3 processes on);
- ``counter``: as ``mirror``, the set protected by a freshness counter (a
  counter file in the PM directory, advanced by rank 0 once per save, in its
  background save: ``plinius train --counter`` under torchrun).

Every mode runs :class:`plinius.dist.StepGate`'s all-gather each step (``fit``
always does in a multi-process job), so ``mirror`` against ``none`` is the
cost of mirroring. The gate itself (the global commit's one collective) is
timed alone: the median of many ``start``/``finish`` pairs, an upper bound of
what it adds to a step, where it overlaps ``optimizer.step()``. Per-step times
are rank 0's (DDP keeps the processes in step); the first three steps (warm-up,
and the first writes into each of the two generations a mirror set's file
keeps: fresh pages of the file system) and the last (a synchronous save) are
left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..crypto import MasterKey
from ._common import BenchConfig, Progress, median

__all__ = ["MODES", "main", "run_ddp", "worker_parser"]

MODES = ("none", "mirror", "ordered", "counter")


def _fit_once(args: argparse.Namespace, key: MasterKey, mode: str, tag: str) -> list[float]:
    """Step times of one ``fit`` in this process (every process runs it together)."""
    import torch.distributed as dist

    from ..counters import FileCounter
    from ..data import SealedDataset
    from ..dist import open_mirror_set, wrap_ddp
    from ..models import build_model
    from ..train import fit, seed_everything

    seed_everything(0)
    spec = build_model(args.model, input_shape=(28, 28), num_classes=10)
    opt = spec.make_optimizer(None)
    steps = args.steps + 4
    sched = spec.make_scheduler(opt, steps)
    model = wrap_ddp(spec.module, ordered=mode == "ordered")
    where = Path(args.pm) / f"ddp-{tag}"
    counter = FileCounter(where.with_suffix(".ctr")) if mode == "counter" else None
    mirrored = mode in ("mirror", "counter")
    mirrors = open_mirror_set(where, key, counter=counter) if mirrored else None
    try:
        with SealedDataset(args.data, key) as ds:
            res = fit(
                model,
                opt,
                loss_fn=spec.loss,
                dataset=ds,
                batch_size=args.batch,
                steps=steps,
                seed=0,
                mirror=mirrors,
                scheduler=sched,
                prepare=spec.prepare,
                split=spec.split,
            )
    finally:
        if mirrors is not None:
            mirrors.close()
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(where, ignore_errors=True)
            where.with_suffix(".ctr").unlink(missing_ok=True)
    return list(res.step_times_s[3:-1])


def _gate_times(iters: int) -> list[float]:
    """Seconds of each StepGate start/finish pair (the global commit's all-gather)."""
    import torch.distributed as dist
    from torch import nn

    from ..dist import StepGate

    gate = StepGate(nn.Identity(), dist.get_rank(), dist.get_world_size())
    out = []
    for i in range(iters + 10):
        t0 = time.perf_counter()
        gate.start(1.0, i)
        gate.finish(i)
        if i >= 10:  # the first ones set up the connections
            out.append(time.perf_counter() - t0)
    return out


def worker_parser(prog: str, rounds: int) -> argparse.ArgumentParser:
    """The options every benchmark worker under torchrun takes (its orchestrator gives them)."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--key", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--pm", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="cnn-10mb")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> None:
    """The worker: run in every process of the torchrun job (see the module docstring)."""
    p = worker_parser("python -m plinius.bench.ddp", 5)
    p.add_argument("--gate-iters", type=int, default=200)
    args = p.parse_args(argv)
    import torch

    from ..dist import finish, init

    torch.set_num_threads(args.threads)
    place = init()
    key = MasterKey.load(args.key)
    steps: dict[str, list[float]] = {m: [] for m in MODES}
    for rnd in range(args.rounds):
        turn = rnd % len(MODES)
        for mode in MODES[turn:] + MODES[:turn]:
            steps[mode] += _fit_once(args, key, mode, f"{rnd}-{mode}")
    gate = _gate_times(args.gate_iters)
    if place.rank == 0:
        Path(args.out).write_text(json.dumps({"step_s": steps, "gate_s": gate}))
    finish(0)  # ends the worker (gloo's teardown at exit may abort it)


def _run_world(
    cfg: BenchConfig, key_path: Path, data: Path, pm: Path, disk: Path, world: int
) -> dict[str, Any]:
    from .multiproc import run_to_end, torchrun_command

    out = disk / f"ddp-{world}.json"
    log = disk / f"ddp-{world}.log"
    batch = cfg.ddp_batch - cfg.ddp_batch % world  # the global batch must split evenly
    args = [
        "--key", str(key_path), "--data", str(data), "--pm", str(pm), "--out", str(out),
        "--model", cfg.ddp_model, "--batch", str(batch), "--steps", str(cfg.ddp_steps),
        "--rounds", str(cfg.ddp_rounds), "--gate-iters", str(cfg.ddp_gate_iters),
        "--threads", str(cfg.threads or 1),
    ]  # fmt: skip
    cmd = torchrun_command(world, 0, args, module=__name__)
    run_to_end(cmd, log, cfg.ddp_timeout_s, f"the DDP benchmark with {world} processes", out)
    raw: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    log.unlink()
    med = {m: median(raw["step_s"][m]) for m in MODES}
    base = med["none"]
    gate = median(raw["gate_s"])
    return {
        "world_size": world,
        "batch": batch,
        "oversubscribed": world > (os.cpu_count() or 1),
        "iteration_s": med,
        "iteration_runs_s": raw["step_s"],
        "overhead_pct": {m: 100.0 * (med[m] / base - 1.0) for m in MODES[1:]},
        # What the set's freshness counter adds to mirroring alone.
        "counter_vs_mirror_pct": 100.0 * (med["counter"] / med["mirror"] - 1.0),
        "gate_s": gate,
        "gate_runs_s": raw["gate_s"],
        "gate_pct": 100.0 * gate / base,
    }


def run_ddp(
    cfg: BenchConfig, key: MasterKey, key_path: Path, pm: Path, disk: Path, progress: Progress
) -> dict[str, Any]:
    """Iteration time under DDP without and with mirroring, the gate, the ordered hook.

    Args:
        cfg: The benchmark's settings (``ddp_*``).
        key: The master key.
        key_path: Its file (the workers load it).
        pm: The scratch PM directory (dataset, mirror sets).
        disk: The scratch disk directory (the workers' logs and results).
        progress: The progress display.

    Returns:
        The section's results, one entry per process count in ``worlds``.
    """
    from ..data import seal_dataset
    from ..models import build_model
    from .overhead import synthetic_mnist

    records = cfg.ddp_batch * (cfg.ddp_steps + 5)
    data = pm / "ddp.pld"
    seal_dataset(data, key, synthetic_mnist(records))
    worlds = []
    try:
        with progress.section("ddp", len(cfg.ddp_worlds)) as advance:
            for world in cfg.ddp_worlds:
                worlds.append(_run_world(cfg, key_path, data, pm, disk, world))
                advance(f"{world} processes")
    finally:
        data.unlink(missing_ok=True)
    spec = build_model(cfg.ddp_model, input_shape=(28, 28), num_classes=10)
    return {
        "model": cfg.ddp_model,
        "batch": cfg.ddp_batch,
        "param_bytes": spec.param_bytes(),
        "rounds": cfg.ddp_rounds,
        "steps_per_round": cfg.ddp_steps,
        "cpu_count": os.cpu_count(),
        "worlds": worlds,
        "target": "mirroring every iteration under DDP adds at most 5%",
        "target_pct": 5.0,
    }


if __name__ == "__main__":  # under torchrun: python -m plinius.bench.ddp
    main(sys.argv[1:])
