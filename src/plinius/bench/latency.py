"""Save and restore latency versus state size: the original's Fig. 7 and Table I.

For each size the same state (the reference CNN and its optimizer) is saved
and restored by every method, interleaved round by round so that a burst of
load on the machine hits all methods alike; the first round is a warm-up and
is not recorded (it lays out the mirror file and warms torch's code paths).

Methods and their phases:

- ``plinius``: ``Mirror.save`` / ``Mirror.restore`` into the PM directory.
  The mirror encrypts straight into the region, so encryption and writing are
  one pass over the bytes; the split is *estimated*: ``encrypt`` is the raw
  AES-GCM time over the same tensors into a scratch buffer in ordinary memory
  (measured in the same round), ``write`` the rest of the save (stores into
  the mapped region beyond what a scratch buffer costs, persist, manifest,
  commit). Likewise ``decrypt`` and ``read`` for a restore.
- ``ssd_encrypted``: :mod:`plinius.bench.baselines` (torch.save to a buffer,
  AES-256-GCM, temp file, fsync, rename, fsync the directory; and back, then
  ``load_state_dict``), with its own phase timers.
- ``torch_save``: plain ``torch.save`` to a file plus fsync; ``torch.load``
  plus ``load_state_dict``. Unencrypted: the insecure reference.
- ``dcp``: ``torch.distributed.checkpoint`` save/load in one process
  (``no_dist=True``, ``FileSystemWriter`` with ``sync_files=True``).
  Unencrypted.
- ``aesgcm_raw``: ``AESGCM.encrypt_into`` / ``decrypt_into`` over the same
  tensors, cut into the mirror's pieces and run on its number of threads, into
  a scratch buffer in ordinary memory: the physical limit here.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._fsutil import fsync_dir
from ..crypto import MAX_AEAD_BYTES, TAG_SIZE, MasterKey, counter_nonce
from ._common import MB, BenchConfig, Notes, Progress, SizeSpec, collect, free_disk, median
from ._common import mem_available as _mem_available

__all__ = ["METHODS", "build_state", "run_latency", "tensor_views"]

METHODS = ("plinius", "ssd_encrypted", "ssd_encrypted_cold", "torch_save", "dcp", "aesgcm_raw")
# Live state, grads while building it, two mirror data slots (tmpfs is RAM), the
# raw-AES scratch buffer and the encrypted SSD restore (file bytes, a slice of
# them, plaintext, the loaded state): about 8 states at the worst moment.
_MEMORY_FACTOR = 8
_MARGIN = 256 * MB


def build_state(size: SizeSpec, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The reference CNN of ``size`` and its optimizer, with optimizer state allocated.

    One optimizer step on a constant gradient creates the momentum buffers (SGD)
    or both moments (Adam), as after the first iteration of training.
    """
    from ..models import reference_cnn

    torch.manual_seed(seed)
    model = reference_cnn(size.param_mb)
    opt: torch.optim.Optimizer
    if size.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def tensor_views(model: nn.Module, opt: torch.optim.Optimizer) -> list[np.ndarray[Any, Any]]:
    """Writable uint8 views of every tensor of the state (parameters, buffers, optimizer)."""
    tensors: list[torch.Tensor] = list(model.state_dict().values())
    for st in opt.state.values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    views = []
    for t in tensors:
        t = t.detach()
        if not t.is_contiguous():  # pragma: no cover - state tensors are contiguous
            continue
        views.append(t.reshape(-1).view(torch.uint8).numpy())
    return views


class _RawAead:
    """AES-GCM over the state's tensors into (and back from) a scratch buffer.

    Cut into the same pieces (``CHUNK_BYTES``) and run on the same number of
    threads as the mirror, so the comparison is with the same parallelism.
    """

    def __init__(self, views: list[np.ndarray[Any, Any]]) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from ..mirror import CHUNK_BYTES, THREADS

        self._aes = AESGCM(os.urandom(32))
        self.threads = max(1, THREADS)
        chunk = min(CHUNK_BYTES, MAX_AEAD_BYTES)
        pieces: list[tuple[int, np.ndarray[Any, Any], int]] = []
        off = 0
        for v in views:
            for a in range(0, max(1, v.nbytes), chunk):
                piece = v[a : a + chunk]
                pieces.append((len(pieces), piece, off))
                off += piece.nbytes + TAG_SIZE
        # Touch every page now: first-touch faults are not part of AES-GCM.
        self._scratch = np.ones(off, dtype=np.uint8)
        # Balance the pieces over the threads by bytes (largest first).
        self._groups: list[list[tuple[int, np.ndarray[Any, Any], int]]] = [
            [] for _ in range(self.threads)
        ]
        loads = [0] * self.threads
        for item in sorted(pieces, key=lambda it: -it[1].nbytes):
            g = loads.index(min(loads))
            self._groups[g].append(item)
            loads[g] += item[1].nbytes
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def _run(self, fn: Callable[[list[tuple[int, np.ndarray[Any, Any], int]]], None]) -> float:
        t0 = time.perf_counter()
        futures = [self._pool.submit(fn, g) for g in self._groups[1:]] if self._pool else []
        fn(self._groups[0])
        for f in futures:
            f.result()
        return time.perf_counter() - t0

    def _enc(self, group: list[tuple[int, np.ndarray[Any, Any], int]]) -> None:
        for i, piece, off in group:
            dst = self._scratch[off : off + piece.nbytes + TAG_SIZE]
            self._aes.encrypt_into(counter_nonce(i), piece.data, b"bench", dst.data)

    def _dec(self, group: list[tuple[int, np.ndarray[Any, Any], int]]) -> None:
        # Decrypts into the very tensors the ciphertext came from: the bytes
        # written are the ones already there, as a restore writes in place.
        for i, piece, off in group:
            src = self._scratch[off : off + piece.nbytes + TAG_SIZE]
            self._aes.decrypt_into(counter_nonce(i), src.data, b"bench", piece.data)

    def encrypt(self) -> dict[str, float]:
        return {"encrypt": self._run(self._enc)}

    def decrypt(self) -> dict[str, float]:
        return {"decrypt": self._run(self._dec)}


class _Methods:
    """The five methods over one state, each a save and a restore returning phase times."""

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        key: MasterKey,
        pm: Path,
        disk: Path,
    ) -> None:
        from ..mirror import Mirror

        self.model, self.opt, self.key = model, opt, key
        self.state: dict[str, Any] = {"model": model, "optim": opt}
        self.mirror_path = pm / "latency.plm"
        self.mirror = Mirror(self.mirror_path, key)
        self.ckpt = disk / "latency-ssd.ckpt"
        self.ckpt_cold = disk / "latency-ssd-cold.ckpt"
        self.plain = disk / "latency-torch.pt"
        self.dcp_dir = disk / "latency-dcp"
        self.disk = disk
        self.raw = _RawAead(tensor_views(model, opt))
        self.step = 0

    def close(self) -> None:
        self.mirror.close()
        self.raw.close()
        for p in (self.mirror_path, self.ckpt, self.ckpt_cold, self.plain):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.dcp_dir, ignore_errors=True)

    def _sd(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

    def _apply(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["optim"])

    def ops(
        self,
    ) -> dict[str, tuple[Callable[[], dict[str, float]], Callable[[], dict[str, float]]]]:
        return {
            "plinius": (self.plinius_save, self.plinius_restore),
            "ssd_encrypted": (self.ssd_save, self.ssd_restore),
            "ssd_encrypted_cold": (self.ssd_cold_save, self.ssd_cold_restore),
            "torch_save": (self.torch_save, self.torch_restore),
            "dcp": (self.dcp_save, self.dcp_restore),
            "aesgcm_raw": (self.raw.encrypt, self.raw.decrypt),
        }

    def plinius_save(self) -> dict[str, float]:
        self.step += 1
        t0 = time.perf_counter()
        self.mirror.save(self.state, step=self.step)
        return {"total": time.perf_counter() - t0}

    def plinius_restore(self) -> dict[str, float]:
        t0 = time.perf_counter()
        step = self.mirror.restore(self.state)
        dt = time.perf_counter() - t0
        if step != self.step:  # a benchmark of a broken restore would be worthless
            raise RuntimeError(f"mirror restored step {step}, expected {self.step}")
        return {"total": dt}

    def ssd_save(self) -> dict[str, float]:
        from .baselines import encrypted_checkpoint_save

        t = encrypted_checkpoint_save(self._sd(), self.ckpt, self.key)
        return {"serialize": t.serialize, "encrypt": t.crypt, "write": t.io}

    def ssd_restore(self) -> dict[str, float]:
        from .baselines import encrypted_checkpoint_load

        sd, t = encrypted_checkpoint_load(self.ckpt, self.key)
        t0 = time.perf_counter()
        self._apply(sd)
        apply = time.perf_counter() - t0
        return {"read": t.io, "decrypt": t.crypt, "deserialize": t.serialize, "apply": apply}

    def ssd_cold_save(self) -> dict[str, float]:
        from .baselines import encrypted_checkpoint_save

        t = encrypted_checkpoint_save(self._sd(), self.ckpt_cold, self.key)
        return {"serialize": t.serialize, "encrypt": t.crypt, "write": t.io}

    def ssd_cold_restore(self) -> dict[str, float]:
        """The same restore after the file's pages were dropped from the page cache,
        as after a reboot or on a new machine: the read comes from the disk."""
        from .baselines import encrypted_checkpoint_load

        fd = os.open(self.ckpt_cold, os.O_RDONLY)
        try:
            # The file was fsynced, so its pages are clean and can be dropped.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        sd, t = encrypted_checkpoint_load(self.ckpt_cold, self.key)
        t0 = time.perf_counter()
        self._apply(sd)
        apply = time.perf_counter() - t0
        return {"read": t.io, "decrypt": t.crypt, "deserialize": t.serialize, "apply": apply}

    def torch_save(self) -> dict[str, float]:
        t0 = time.perf_counter()
        with open(self.plain, "wb") as f:
            torch.save(self._sd(), f)
            f.flush()
            t1 = time.perf_counter()
            os.fsync(f.fileno())
        t2 = time.perf_counter()
        return {"serialize+write": t1 - t0, "fsync": t2 - t1}

    def torch_restore(self) -> dict[str, float]:
        t0 = time.perf_counter()
        sd = torch.load(self.plain, weights_only=True)
        t1 = time.perf_counter()
        self._apply(sd)
        return {"read+deserialize": t1 - t0, "apply": time.perf_counter() - t1}

    def dcp_save(self) -> dict[str, float]:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        from torch.distributed.checkpoint.state_dict_saver import save

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is ... a single process"
            save(
                self._sd(),
                storage_writer=FileSystemWriter(self.dcp_dir, sync_files=True),
                no_dist=True,
            )
        fsync_dir(self.dcp_dir)
        return {"write": time.perf_counter() - t0}

    def dcp_restore(self) -> dict[str, float]:
        from torch.distributed.checkpoint.filesystem import FileSystemReader
        from torch.distributed.checkpoint.state_dict_loader import load

        t0 = time.perf_counter()
        sd = self._sd()  # DCP loads into these tensors in place
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load(sd, storage_reader=FileSystemReader(self.dcp_dir), no_dist=True)
        t1 = time.perf_counter()
        self._apply(sd)
        return {"read+deserialize": t1 - t0, "apply": time.perf_counter() - t1}


def _fits(size: SizeSpec, cfg: BenchConfig) -> str | None:
    """Why ``size`` cannot run here, or None."""
    need = size.approx_state_bytes * _MEMORY_FACTOR + _MARGIN
    avail = _mem_available()
    if avail and need > avail:
        return (
            f"needs about {need / 1e9:.1f} GB of memory, {avail / 1e9:.1f} GB available "
            "(MemAvailable)"
        )
    disk_need = size.approx_state_bytes * 3 + _MARGIN
    if free_disk(cfg.disk_dir) < disk_need:
        return f"needs about {disk_need / 1e9:.1f} GB free in {cfg.disk_dir}"
    pm_need = size.approx_state_bytes * 2 + _MARGIN
    if free_disk(cfg.pm_dir) < pm_need:
        return f"needs about {pm_need / 1e9:.1f} GB free in {cfg.pm_dir}"
    return None


def _summarize(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m, ops in runs.items():
        entry: dict[str, Any] = {}
        for op, samples in ops.items():
            totals = [sum(s.values()) for s in samples]
            entry[f"{op}_s"] = median(totals)
            entry[f"{op}_runs_s"] = totals
            entry[f"{op}_phases_s"] = {k: median([s[k] for s in samples]) for k in samples[0]}
        out[m] = entry
    # The mirror's phases, estimated from raw AES-GCM over the same bytes (see the docstring).
    p, raw = out["plinius"], out["aesgcm_raw"]
    enc, dec = raw["save_s"], raw["restore_s"]
    p["save_phases_s"] = {"encrypt": min(enc, p["save_s"]), "write": max(0.0, p["save_s"] - enc)}
    p["restore_phases_s"] = {
        "read": max(0.0, p["restore_s"] - dec),
        "decrypt": min(dec, p["restore_s"]),
    }
    return out


def run_latency(
    cfg: BenchConfig, key: MasterKey, pm: Path, disk: Path, progress: Progress, notes: Notes
) -> dict[str, Any]:
    """Measure every method at every size of ``cfg``; skips sizes that do not fit, saying why."""
    sizes: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with progress.section("latency", len(cfg.sizes) * (cfg.repeats + 1)) as advance:
        for size in cfg.sizes:
            why = _fits(size, cfg)
            if why is not None:
                skipped.append({"size": size.label, "reason": why})
                notes.skipped.append({"section": "latency", "size": size.label, "reason": why})
                for _ in range(cfg.repeats + 1):
                    advance(f"{size.label} MB skipped")
                continue
            sizes.append(_one_size(size, cfg, key, pm, disk, advance))
            collect()
    return {
        "repeats": cfg.repeats,
        "methods": list(METHODS),
        "sizes": sizes,
        "skipped": skipped,
        "method_notes": {
            "plinius": "Mirror.save/restore in the PM dir; encrypt/decrypt phases estimated "
            "from raw AES-GCM over the same tensors, write/read = the rest",
            "ssd_encrypted": "torch.save to a buffer, AES-256-GCM, temp file, fsync, rename, "
            "fsync dir (plinius.bench.baselines); restore: read, decrypt, torch.load, "
            "load_state_dict",
            "torch_save": "torch.save to a file + fsync; torch.load + load_state_dict "
            "(unencrypted)",
            "dcp": "torch.distributed.checkpoint save/load, one process, FileSystemWriter "
            "sync_files=True (unencrypted)",
            "aesgcm_raw": "AESGCM.encrypt_into/decrypt_into over the same tensors, in the "
            "mirror's pieces and on its number of threads, scratch buffer in RAM: the physical "
            "limit",
        },
    }


def _one_size(
    size: SizeSpec,
    cfg: BenchConfig,
    key: MasterKey,
    pm: Path,
    disk: Path,
    advance: Callable[[str], None],
) -> dict[str, Any]:
    model, opt = build_state(size)
    methods = _Methods(model, opt, key, pm, disk)
    try:
        ops = methods.ops()
        runs: dict[str, dict[str, list[dict[str, float]]]] = {
            m: {"save": [], "restore": []} for m in METHODS
        }
        for rnd in range(cfg.repeats + 1):
            for m in METHODS:
                save, restore = ops[m]
                s = save()
                collect()
                r = restore()
                collect()
                if rnd > 0:  # round 0 is the warm-up
                    runs[m]["save"].append(s)
                    runs[m]["restore"].append(r)
            advance(f"{size.label} MB" + (" warm-up" if rnd == 0 else f" round {rnd}"))
        info = methods.mirror.info()
    finally:
        methods.close()
    state_bytes = sum(v.nbytes for v in tensor_views(model, opt))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    summary = _summarize(runs)
    plinius = summary["plinius"]
    speedup = {
        m: {
            "save": summary[m]["save_s"] / plinius["save_s"],
            "restore": summary[m]["restore_s"] / plinius["restore_s"],
        }
        for m in METHODS
        if m != "plinius"
    }
    throughput = {
        m: {
            "save": state_bytes / summary[m]["save_s"] / 1e9,
            "restore": state_bytes / summary[m]["restore_s"] / 1e9,
        }
        for m in METHODS
    }
    return {
        "size": size.label,
        "optimizer": size.optimizer,
        "param_mb": param_bytes / MB,
        "state_bytes": state_bytes,
        "state_mb": state_bytes / MB,
        "mirror_tensor_bytes": int(getattr(info, "tensor_bytes", 0)),
        "mirror_is_pmem": bool(getattr(info, "is_pmem", False)),
        "methods": summary,
        "time_vs_plinius": speedup,
        "throughput_gb_s": throughput,
        "plinius_pct_of_raw_aesgcm": {
            "save": 100.0 * summary["aesgcm_raw"]["save_s"] / plinius["save_s"],
            "restore": 100.0 * summary["aesgcm_raw"]["restore_s"] / plinius["restore_s"],
        },
    }
