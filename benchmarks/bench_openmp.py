"""How torch's idle OpenMP threads slow a mirror save, and what the spin count costs torch.

``python benchmarks/bench_openmp.py [--rounds 3]`` runs, for each OpenMP setting below, a
child process (libgomp reads its environment once, when torch loads it) that measures:

* ``save_after_step_ms``: ``Mirror.save`` of cnn-10mb with SGD momentum (a 20 MB state, in
  ``/dev/shm``) right after a training step at batch 128, median of 10; and the same save
  after the step plus a 50 ms pause (the spinning threads have gone to sleep by then);
* ``step_ms``: one training step (forward, backward, ``optimizer.step()``) without any mirror,
  for cnn-tiny and cnn-10mb at batch 128 and cnn-tiny at batch 32, median of 30-80.

Settings: libgomp's default (``GOMP_SPINCOUNT`` unset: 300,000 idle spins), the spin count
the ``plinius`` command sets (10,000), and ``OMP_WAIT_POLICY=PASSIVE`` (no spinning). Rounds
alternate the settings so that a burst of load elsewhere hits them alike. Nothing is
asserted; the output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SETTINGS: dict[str, dict[str, str]] = {
    "libgomp default": {},
    "GOMP_SPINCOUNT=10000 (plinius CLI)": {"GOMP_SPINCOUNT": "10000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def _child() -> dict[str, Any]:
    import torch

    from plinius.crypto import MasterKey
    from plinius.mirror import Mirror
    from plinius.models import build_model

    torch.set_num_threads(2)
    out: dict[str, Any] = {}

    def step_time(name: str, batch: int, n: int) -> float:
        torch.manual_seed(0)
        spec = build_model(name, input_shape=(28, 28), num_classes=10)
        opt = spec.make_optimizer(None)
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            spec.loss(spec.module(x), y).backward()
            opt.step()
            opt.zero_grad()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts[5:]) * 1e3

    out["step_ms"] = {
        "cnn-tiny b32": step_time("cnn-tiny", 32, 80),
        "cnn-tiny b128": step_time("cnn-tiny", 128, 80),
        "cnn-10mb b128": step_time("cnn-10mb", 128, 30),
    }
    torch.manual_seed(0)
    spec = build_model("cnn-10mb", input_shape=(28, 28), num_classes=10)
    opt = spec.make_optimizer(None)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    state = {"model": spec.module, "optim": opt}
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with (
        tempfile.TemporaryDirectory(dir=shm) as d,
        Mirror(Path(d) / "m.plm", MasterKey.generate()) as mirror,
    ):
        for pause, label in ((0.0, "save_after_step_ms"), (0.05, "save_after_pause_ms")):
            ts = []
            for i in range(12):
                spec.loss(spec.module(x), y).backward()
                opt.step()
                opt.zero_grad()
                time.sleep(pause)
                t0 = time.perf_counter()
                mirror.save(state, step=i)
                ts.append(time.perf_counter() - t0)
            out[label] = statistics.median(ts[2:]) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="OpenMP idle spinning against mirror saves.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child()))
        return
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SETTINGS}
    for _ in range(args.rounds):
        for name, extra in SETTINGS.items():
            res = subprocess.run(
                [sys.executable, __file__, "--child"],
                env={**base, **extra},
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(res.stdout))

    def med(name: str, *path: str) -> float:
        vals = []
        for r in runs[name]:
            v: Any = r
            for p in path:
                v = v[p]
            vals.append(v)
        return round(statistics.median(vals), 2)

    summary = {
        name: {
            "save_after_step_ms": med(name, "save_after_step_ms"),
            "save_after_pause_ms": med(name, "save_after_pause_ms"),
            "step_ms": {k: med(name, "step_ms", k) for k in runs[name][0]["step_ms"]},
        }
        for name in SETTINGS
    }
    print(json.dumps({"rounds": args.rounds, "median_of_rounds": summary}, indent=2))


if __name__ == "__main__":
    main()
