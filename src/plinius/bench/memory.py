"""Peak extra memory of a save and a restore, against torch.save / torch.load.

Measured in a child process (``python -m plinius.bench.memory``) so that
nothing the benchmark did before disturbs the numbers. Method:

- the child builds the state (reference CNN and optimizer), opens the mirror
  and saves once, so the region is laid out and its pages are mapped before
  anything is measured (the region is the storage itself, like a checkpoint
  file, not memory a save needs);
- before each operation it collects garbage, reads its resident set size
  (``VmRSS``), and resets the kernel's peak RSS counter by writing ``5`` to
  ``/proc/self/clear_refs``; after the operation it reads the peak
  (``VmHWM``). Peak extra memory = ``VmHWM - VmRSS before``. This sees every
  allocation, torch's and OpenSSL's included (tracemalloc sees only Python's).
  Where ``clear_refs`` is not available, a thread samples ``VmRSS`` every
  0.2 ms instead (and may miss a short peak);
- glibc's malloc is started with a fixed mmap threshold
  (``MALLOC_MMAP_THRESHOLD_``), so large buffers freed by one operation go back
  to the kernel instead of being reused, unseen, by the next.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._common import MB, BenchConfig, Notes, Progress, SizeSpec, mem_available

__all__ = ["OPS", "run_memory"]

OPS = (
    "plinius_save",
    "plinius_restore",
    "torch_save",
    "torch_load",
    "ssd_encrypted_save",
    "ssd_encrypted_load",
)


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _rss() -> int:
    return _status_kb("VmRSS")


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _status_kb("VmHWM") <= _rss() + 4 * 1024 * 1024
    except OSError:
        return False


def _measure(fn: Callable[[], object], reset: bool) -> int:
    """Peak RSS above the RSS before ``fn``, in bytes."""
    gc.collect()
    before = _rss()
    if reset:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        fn()
        peak = _status_kb("VmHWM")
    else:
        stop = threading.Event()
        box = [before]

        def sample() -> None:
            while not stop.is_set():
                box[0] = max(box[0], _rss())
                time.sleep(0.0002)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            fn()
        finally:
            stop.set()
            th.join()
        peak = max(box[0], _rss())
    return max(0, peak - before)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..crypto import MasterKey
    from ..mirror import Mirror
    from .baselines import encrypted_checkpoint_load, encrypted_checkpoint_save
    from .latency import build_state, tensor_views

    size = SizeSpec(float(spec["mb"]), str(spec["optimizer"]))
    pm, disk = Path(spec["pm"]), Path(spec["disk"])
    torch.set_num_threads(1)
    model, opt = build_state(size)
    state = {"model": model, "optim": opt}
    state_bytes = sum(v.nbytes for v in tensor_views(model, opt))
    key = MasterKey.generate()
    mpath, tpath, cpath = pm / "memory.plm", disk / "memory-torch.pt", disk / "memory-ssd.ckpt"
    reset = _can_reset_peak()
    out: dict[str, int] = {}
    try:
        with Mirror(mpath, key) as mirror:
            mirror.save(state, step=1)  # lay out and map the region first
            mirror.restore(state)

            def sd() -> dict[str, Any]:
                return {"model": model.state_dict(), "optim": opt.state_dict()}

            def apply(loaded: dict[str, Any]) -> None:
                model.load_state_dict(loaded["model"])
                opt.load_state_dict(loaded["optim"])

            def torch_save() -> None:
                with open(tpath, "wb") as f:
                    torch.save(sd(), f)
                    f.flush()
                    os.fsync(f.fileno())

            def torch_load() -> None:
                apply(torch.load(tpath, weights_only=True))

            def ssd_load() -> None:
                loaded, _ = encrypted_checkpoint_load(cpath, key)
                apply(loaded)

            ops: dict[str, Callable[[], object]] = {
                "plinius_save": lambda: mirror.save(state, step=2),
                "plinius_restore": lambda: mirror.restore(state),
                "torch_save": torch_save,
                "torch_load": torch_load,
                "ssd_encrypted_save": lambda: encrypted_checkpoint_save(sd(), cpath, key),
                "ssd_encrypted_load": ssd_load,
            }
            for name in OPS:
                out[name] = _measure(ops[name], reset)
    finally:
        for p in (mpath, tpath, cpath):
            p.unlink(missing_ok=True)
    return {
        "state_bytes": state_bytes,
        "peak_extra_bytes": out,
        "method": "VmHWM reset via /proc/self/clear_refs" if reset else "VmRSS sampled at 0.2 ms",
    }


def run_memory(
    cfg: BenchConfig, pm: Path, disk: Path, progress: Progress, notes: Notes
) -> dict[str, Any]:
    """Run the child for ``cfg.memory_mb`` and return peak extra memory per operation."""
    size = SizeSpec(cfg.memory_mb, "sgd")
    need = size.approx_state_bytes * 6 + 256 * MB
    avail = mem_available()
    if avail and need > avail:
        why = f"needs about {need / 1e9:.1f} GB of memory, {avail / 1e9:.1f} GB available"
        notes.skipped.append({"section": "memory", "size": size.label, "reason": why})
        return {"skipped": why, "size": size.label}
    spec = {"mb": size.mb, "optimizer": size.optimizer, "pm": str(pm), "disk": str(disk)}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    with progress.section("memory", 1) as advance:
        proc = subprocess.run(
            [sys.executable, "-m", "plinius.bench.memory", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        advance(f"{size.label} MB")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the memory benchmark child failed: {tail[0]}")
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    sb = res["state_bytes"]
    res["peak_extra_pct_of_state"] = {k: 100.0 * v / sb for k, v in res["peak_extra_bytes"].items()}
    res["size"] = size.label
    res["target"] = "a save or restore needs at most 5% of the state extra"
    res["target_pct"] = 5.0
    return res


if __name__ == "__main__":  # pragma: no cover - run as a child by run_memory
    print(json.dumps(_child(json.loads(sys.argv[1]))))
