"""Mirror save/restore benchmark: a thin wrapper over ``plinius bench``.

``python benchmarks/bench_mirror.py [--quick] [--sizes 10,50,100,300] [--out DIR]`` runs the
latency and memory sections of :mod:`plinius.bench` (the one implementation of every
measurement): mirror save/restore against an encrypted SSD checkpoint, torch.save,
torch.distributed.checkpoint and raw AES-GCM, split into phases, plus peak extra memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plinius.bench import BenchConfig, parse_sizes, run_bench


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and run the mirror sections of ``plinius bench``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--sizes", default="10,50,100,300", help="MB of state, e.g. 10,100,300:adam")
    ap.add_argument("--out", type=Path, default=Path("bench-out/mirror"))
    ap.add_argument("--pm-dir", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--disk-dir", type=Path, default=Path("."))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig.preset(args.quick, out=args.out, pm_dir=args.pm_dir, disk_dir=args.disk_dir)
    cfg.sections = ("latency", "memory")
    cfg.sizes = parse_sizes(args.sizes)
    run_bench(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
