"""Save and restore latency of the mirror alone, in a tight loop: for A/B runs of two trees.

Medians and minima of ``--iters`` save/restore pairs on the bench's reference states
(the CNN of N MB of parameters with SGD momentum), plus a save of 200 small modules
(400 tensors) that exposes the per-tensor Python cost. Run it on two source trees,
alternating, in one sitting::

    PYTHONPATH=/path/to/old/src python benchmarks/bench_save_restore.py --iters 40
    PYTHONPATH=src python benchmarks/bench_save_restore.py --iters 40

The mirror lives in /dev/shm (emulated PM: RAM; it survives a process crash, not a power cut).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from plinius.bench import parse_sizes
from plinius.bench.latency import build_state
from plinius.crypto import MasterKey
from plinius.mirror import Mirror


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.2f} ms (min {min(xs) * 1e3:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,50", help="MB of parameters, as plinius bench --sizes")
    ap.add_argument("--iters", type=int, default=40, help="save/restore pairs per size")
    args = ap.parse_args()
    key = MasterKey.generate()
    for size in parse_sizes(args.sizes):
        model, opt = build_state(size)
        state = {"model": model, "optim": opt, "step": 0}
        with (
            tempfile.TemporaryDirectory(dir="/dev/shm") as d,
            Mirror(os.path.join(d, "m.plm"), key) as m,
        ):
            for _ in range(3):  # warm-up: growth, memo, page faults
                m.save(state, step=0)
            saves, restores = [], []
            for i in range(args.iters):
                t = time.perf_counter()
                m.save(state, step=i)
                saves.append(time.perf_counter() - t)
                t = time.perf_counter()
                m.restore(state)
                restores.append(time.perf_counter() - t)
        print(f"{size.mb:g} MB: save {_ms(saves)}, restore {_ms(restores)}")
    small = {"model": torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(200)])}
    with (
        tempfile.TemporaryDirectory(dir="/dev/shm") as d,
        Mirror(os.path.join(d, "m.plm"), key) as m,
    ):
        for _ in range(5):
            m.save(small, step=0)
        saves = []
        for i in range(200):
            t = time.perf_counter()
            m.save(small, step=i)
            saves.append(time.perf_counter() - t)
    print(f"400 small tensors: save {_ms(saves)}")


if __name__ == "__main__":
    main()
