"""``plinius bench``: the original evaluation reproduced here, side by side with peers.

One process, one run, eight sections (children only where a SIGKILL, a clean
memory measurement or torchrun needs them):

1. ``latency``: save/restore versus state size, with phases, against an
   encrypted disk checkpoint, torch.save, torch.distributed.checkpoint and raw
   AES-GCM (:mod:`.latency`);
2. ``overhead``: iteration time with no mirror, a synchronous and an
   asynchronous mirror every iteration (:mod:`.overhead`);
3. ``sealed``: iteration time on sealed versus plain data, and decryption
   throughput (:mod:`.sealed`);
4. ``recovery``: process start to first resumed step after SIGKILL, by phase
   (:mod:`.recovery`);
5. ``memory``: peak extra memory of a save and a restore (:mod:`.memory`);
6. ``ddp``: iteration time under DistributedDataParallel (torchrun, 2 and 3
   processes) without and with a mirror set, the global commit's all-gather,
   and the ordered all-reduce hook (:mod:`.ddp`);
7. ``dcp``: ``torch.distributed.checkpoint`` into plinius' encrypted storage
   against DCP's own ``FileSystemWriter`` (:mod:`.dcp`);
8. ``replicas``: two torchrun agents standing for two machines: the cost of
   peer replicas per step, the bytes they send, and the time from a machine's
   loss to the job's next step against a restart from an encrypted disk
   checkpoint (:mod:`.replicas`).

Results go to ``results.json``, ``results.md`` and PNG plots (:mod:`.report`).
Every file created in the PM and disk directories is removed at the end.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._common import (
    FULL_SIZES,
    QUICK_SIZES,
    SECTIONS,
    BenchConfig,
    Notes,
    Progress,
    SizeSpec,
    frozen_heap,
    machine_info,
    parse_sizes,
)

__all__ = [
    "FULL_SIZES",
    "QUICK_SIZES",
    "SECTIONS",
    "BenchConfig",
    "SizeSpec",
    "parse_sizes",
    "run_bench",
]

# Public names report their public home, not the private module that defines them.
BenchConfig.__module__ = SizeSpec.__module__ = parse_sizes.__module__ = __name__


def _storage_notes(pm_kind: str, is_dax: bool, disk_device: str) -> list[str]:
    notes = []
    if is_dax:
        notes.append(
            "The PM directory is a DAX mount: the mirror is written to persistent memory "
            "and survives a power cut once persisted."
        )
    else:
        notes.append(
            "The PM directory is not DAX. On tmpfs (/dev/shm) it is *emulated* PM, as in the "
            "original's first setup: plain RAM, so a mirror survives the crash of the process "
            "(SIGKILL, OOM kill, a bug) but not a power cut or a reboot of the machine, and "
            "persisting it costs almost nothing; real PM (Optane, CXL) writes more slowly "
            "than DRAM, so the mirror's write share would grow there."
        )
    if "virtio" in disk_device or "virtual" in disk_device:
        notes.append(
            "The disk directory is on a virtual disk: its fsync latency and bandwidth are "
            "those of the hypervisor's storage stack, not of a local SSD, and may be cached "
            "by the host; they vary with the host's other tenants."
        )
    notes.append(
        "Disk restores read files written moments before, so they come from the page cache "
        "(as after a process crash, not after a reboot); the disk methods' restore times are "
        "therefore a lower bound."
    )
    notes.append(
        "Timings taken while other work runs on the same cores vary from run to run; "
        "methods are interleaved round by round so that they share the same conditions, "
        "and the ratios are steadier than the absolute numbers."
    )
    return notes


def run_bench(cfg: BenchConfig, *, progress: bool | str = True) -> dict[str, Any]:
    """Run the sections of ``cfg`` and write the report into ``cfg.out``; return the results.

    ``progress``: ``True`` rich bars, ``"plain"`` a plain line every few seconds on
    stderr (outside a terminal), ``False`` nothing.
    """
    from ..crypto import MasterKey
    from ..pmem import dax_option, describe_path, mount_of

    for name in cfg.sections:
        if name not in SECTIONS:
            raise ConfigError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    for label, d in (("--pm-dir", cfg.pm_dir), ("--disk-dir", cfg.disk_dir)):
        if not d.is_dir():
            raise ConfigError(f"{label} {d} is not an existing directory; create it first")
    if cfg.repeats < 1:
        raise ConfigError("the number of repetitions must be at least 1")
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output directory {cfg.out}: {exc.strerror}") from exc
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)

    t_begin = time.perf_counter()
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    notes = Notes()
    machine = machine_info(cfg.pm_dir, cfg.disk_dir)
    is_dax = dax_option(mount_of(cfg.pm_dir).options) is not None
    results: dict[str, Any] = {}
    # Private scratch directories, removed whatever happens.
    pm = Path(tempfile.mkdtemp(prefix="plinius-bench-", dir=cfg.pm_dir))
    disk = Path(tempfile.mkdtemp(prefix="plinius-bench-", dir=cfg.disk_dir))
    mirror_is_pmem: bool | None = None
    section_s: dict[str, float] = {}
    try:
        key = MasterKey.generate()
        key_path = disk / "bench.key"
        key.save(key_path)
        with frozen_heap(), Progress(progress) as bars:
            if "latency" in cfg.sections:
                from .latency import run_latency

                t0 = time.perf_counter()
                results["latency"] = run_latency(cfg, key, pm, disk, bars, notes)
                section_s["latency"] = time.perf_counter() - t0
                if results["latency"]["sizes"]:
                    mirror_is_pmem = results["latency"]["sizes"][0]["mirror_is_pmem"]
            if "overhead" in cfg.sections:
                from .overhead import run_overhead

                t0 = time.perf_counter()
                results["overhead"] = run_overhead(cfg, key, pm, bars)
                section_s["overhead"] = time.perf_counter() - t0
            if "sealed" in cfg.sections:
                from .sealed import run_sealed

                t0 = time.perf_counter()
                results["sealed"] = run_sealed(cfg, key, pm, bars)
                section_s["sealed"] = time.perf_counter() - t0
            if "recovery" in cfg.sections:
                from .recovery import run_recovery, run_standby_recovery

                t0 = time.perf_counter()
                results["recovery"] = run_recovery(cfg, key, key_path, pm, disk, bars)
                results["recovery"]["standby"] = run_standby_recovery(
                    cfg, key, key_path, pm, disk, bars
                )
                section_s["recovery"] = time.perf_counter() - t0
            if "memory" in cfg.sections:
                from .memory import run_memory

                t0 = time.perf_counter()
                results["memory"] = run_memory(cfg, pm, disk, bars, notes)
                section_s["memory"] = time.perf_counter() - t0
            if "ddp" in cfg.sections:
                from .ddp import run_ddp

                t0 = time.perf_counter()
                results["ddp"] = run_ddp(cfg, key, key_path, pm, disk, bars)
                section_s["ddp"] = time.perf_counter() - t0
            if "dcp" in cfg.sections:
                from .dcp import run_dcp

                t0 = time.perf_counter()
                results["dcp"] = run_dcp(cfg, key, disk, bars)
                section_s["dcp"] = time.perf_counter() - t0
            if "replicas" in cfg.sections:
                from .replicas import run_replicas

                t0 = time.perf_counter()
                results["replicas"] = run_replicas(cfg, key, key_path, pm, disk, bars)
                section_s["replicas"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(pm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    results["meta"] = {
        "command": cfg.command,
        "quick": cfg.quick,
        "started": started,
        "wall_s": time.perf_counter() - t_begin,
        "section_s": section_s,
        "sections": [s for s in SECTIONS if s in cfg.sections],
        "sizes": [s.label for s in cfg.sizes],
        "repeats": cfg.repeats,
        "machine": machine,
        "pm_is_dax": is_dax,
        "mirror_is_pmem": mirror_is_pmem,
        "pm_description": describe_path(cfg.pm_dir),
        "storage_notes": _storage_notes(machine["pm_kind"], is_dax, machine["disk_device"]),
        "skipped": notes.skipped,
        "notes": notes.notes,
    }
    from .report import write_json, write_markdown, write_plots

    results["plots"] = [str(p) for p in write_plots(results, cfg.out)] if cfg.plots else []
    results["files"] = {
        "json": str(cfg.out / "results.json"),
        "markdown": str(cfg.out / "results.md"),
    }
    write_json(results, cfg.out)
    write_markdown(results, cfg.out)
    return results
