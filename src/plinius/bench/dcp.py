"""The ``dcp`` section: plinius' encrypted DCP storage against DCP's own ``FileSystemWriter``.

For each size a state of float32 tensors (the size's parameters, plus Adam's two
moments for ``:adam`` sizes) is saved with ``torch.distributed.checkpoint`` in
one process, into the disk directory, by DCP's ``FileSystemWriter``
(``sync_files=True``) and by :class:`plinius.dcp.PliniusWriter` (which fsyncs
too), and loaded back in place by each reader. The two methods alternate round
by round so they share the machine's conditions; the report gives medians and
the ratio encrypted / plain.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..crypto import MasterKey
from ._common import BenchConfig, Progress, median

__all__ = ["METHODS", "run_dcp"]

METHODS = ("plain", "plinius")
# One tensor per this many parameters, so that DCP plans a realistic number of items.
_TENSOR_ELEMS = 1 << 20


def _state(mb: float, optimizer: str) -> dict[str, Any]:
    n = max(1, int(mb * 1e6 / 4))
    gen = torch.Generator().manual_seed(0)
    sizes = [min(_TENSOR_ELEMS, n - o) for o in range(0, n, _TENSOR_ELEMS)]
    params = {f"w{i}": torch.randn(s, generator=gen) for i, s in enumerate(sizes)}
    state: dict[str, Any] = {"model": params, "step": 1}
    if optimizer == "adam":
        state["optim"] = {
            k: {"exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
            for k, v in params.items()
        }
    return state


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


def _save(method: str, state: dict[str, Any], d: Path, key: MasterKey) -> float:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    from .._fsutil import fsync_dir
    from ..dcp import PliniusWriter

    writer = FileSystemWriter(d, sync_files=True) if method == "plain" else PliniusWriter(d, key)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is ... a single process"
        save(state, storage_writer=writer, no_dist=True)
    if method == "plain":
        fsync_dir(d)  # plinius' commit syncs its directory; give DCP's the same durability
    return time.perf_counter() - t0


def _load(method: str, state: dict[str, Any], d: Path, key: MasterKey) -> float:
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load

    from ..dcp import PliniusReader

    reader = FileSystemReader(d) if method == "plain" else PliniusReader(d, key)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load(state, storage_reader=reader, no_dist=True)
    return time.perf_counter() - t0


def run_dcp(cfg: BenchConfig, key: MasterKey, disk: Path, bars: Progress) -> dict[str, Any]:
    """Save and load times of DCP's plain and plinius' encrypted storage, by size.

    Returns:
        ``{"sizes": [{"size", "state_bytes", "save_s", "load_s", "ratio"}], "repeats"}``:
        medians per method, and encrypted / plain ratios.
    """
    rows = []
    with bars.section("dcp", len(cfg.dcp_sizes) * cfg.repeats * 2) as advance:
        for size in cfg.dcp_sizes:
            state = _state(size.param_mb, size.optimizer)
            times: dict[str, dict[str, list[float]]] = {
                m: {"save": [], "load": []} for m in METHODS
            }
            dirs = {m: disk / f"dcp-{m}" for m in METHODS}
            try:
                for r in range(cfg.repeats):
                    # Alternate which goes first: neither always meets a warmer cache.
                    order = METHODS if r % 2 == 0 else METHODS[::-1]
                    for m in order:
                        times[m]["save"].append(_save(m, state, dirs[m], key))
                        times[m]["load"].append(_load(m, state, dirs[m], key))
                        advance(f"{size.label} {m}")
            finally:
                for d in dirs.values():
                    shutil.rmtree(d, ignore_errors=True)
            save_s = {m: median(times[m]["save"]) for m in METHODS}
            load_s = {m: median(times[m]["load"]) for m in METHODS}
            rows.append(
                {
                    "size": size.label,
                    "state_bytes": _nbytes(state),
                    "save_s": save_s,
                    "load_s": load_s,
                    "ratio": {
                        "save": save_s["plinius"] / save_s["plain"],
                        "load": load_s["plinius"] / load_s["plain"],
                    },
                }
            )
    return {"sizes": rows, "repeats": cfg.repeats}
