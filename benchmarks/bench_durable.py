"""The durable tier's cost on the training step.

Run ``python benchmarks/bench_durable.py [--params N] [--steps S] [--durable-dir DIR]``.
An MLP of about N parameters with Adam is trained by ``fit`` into a mirror in
/dev/shm, in alternating runs without and with a :class:`plinius.mirror.DurableCopy`
(every step: the worst case, and every 10 steps). Reported: the median step
time of each run, the median memcpy (``Mirror.copy_committed``) time, the
mirror bytes copied, and how many copies were written or skipped (a copy is
skipped while the previous one is still being written). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plinius.crypto import MasterKey
from plinius.mirror import DurableCopy, Mirror
from plinius.train import fit


def _run(params: int, steps: int, shm: Path, disk: Path | None, every: int) -> dict[str, Any]:
    torch.manual_seed(0)
    width = max(16, int((params / 2) ** 0.5))
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.utils.data.TensorDataset(torch.randn(512, width), torch.randint(0, 10, (512,)))
    key = MasterKey.generate()
    path = shm / "bench.plm"
    path.unlink(missing_ok=True)
    copy_s: list[float] = []
    durable = DurableCopy(disk, "bench.plm", every=every) if disk is not None else None
    if durable is not None:
        real = Mirror.copy_committed

        def timed(self: Mirror, out: Any = None) -> Any:
            t = time.perf_counter()
            c = real(self, out)
            copy_s.append(time.perf_counter() - t)
            return c

        Mirror.copy_committed = timed  # type: ignore[method-assign]
    try:
        with Mirror(path, key) as m:
            res = fit(model, opt, loss_fn=nn.functional.cross_entropy, dataset=data,  # type: ignore[arg-type]
                      batch_size=64, steps=steps, mirror=m, durable=durable)  # fmt: skip
            nbytes = m.copy_committed().nbytes if durable is None else None
    finally:
        if durable is not None:
            durable.close()
            Mirror.copy_committed = real  # type: ignore[method-assign]
    path.unlink(missing_ok=True)
    out: dict[str, Any] = {
        "step_ms": statistics.median(res.step_times_s[1:]) * 1e3,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if nbytes is not None:
        out["mirror_in_use_mb"] = nbytes / 1e6
    if durable is not None:
        out["copy_ms"] = statistics.median(copy_s) * 1e3 if copy_s else None
        out["copies"], out["skipped"] = durable.copies, durable.skipped
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=4_000_000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--durable-dir", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    disk = Path(tempfile.mkdtemp(dir=a.durable_dir))
    try:
        for r in range(a.rounds):
            for label, d, every in (
                ("none", None, 1),
                ("every 1", disk, 1),
                ("every 10", disk, 10),
            ):
                print(f"round {r} durable {label:8s}", _run(a.params, a.steps, shm, d, every))
    finally:
        shutil.rmtree(shm)
        shutil.rmtree(disk)


if __name__ == "__main__":
    main()
