"""Sealed-data overhead (the original's Fig. 8) and decryption throughput.

Iteration time: the reference CNN trains at batch 128 on the same synthetic
MNIST-shaped records, fetched either from plain tensors in memory (index the
arrays) or from the sealed dataset (``SealedDataset.get_batch``, decrypting the
chunks a batch needs). Both read the same chunk-shuffled index order
(``SealedSampler``), a fresh model with the same seed, alternating round by
round; each run opens the dataset anew so no chunk cache carries over.

Throughput: one pass over the whole dataset with ``get_batch`` (every chunk
decrypted once, records copied out) against raw ``AESGCM.decrypt_into`` over
the same bytes in the same chunk sizes into a scratch buffer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..crypto import TAG_SIZE, MasterKey, counter_nonce
from ._common import BenchConfig, Progress, collect, median
from .overhead import synthetic_mnist

__all__ = ["run_sealed"]


def _train_run(
    cfg: BenchConfig,
    key: MasterKey,
    path: Path,
    plain: tuple[torch.Tensor, torch.Tensor],
    batches: list[list[int]],
    sealed: bool,
) -> tuple[list[float], list[float]]:
    from ..data import SealedDataset
    from ..models import build_model
    from ..train import seed_everything

    seed_everything(0)
    spec = build_model(cfg.overhead_model, input_shape=(28, 28), num_classes=10)
    opt = spec.make_optimizer(None)
    model = spec.module
    model.train()
    iters: list[float] = []
    fetches: list[float] = []
    with SealedDataset(path, key) as ds:
        for i, idx in enumerate(batches):
            t0 = time.perf_counter()
            if sealed:
                x, y = ds.get_batch(idx)
            else:
                ti = torch.as_tensor(idx)
                x, y = plain[0][ti], plain[1][ti]
            t1 = time.perf_counter()
            loss = spec.loss(model(spec.prepare(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            t2 = time.perf_counter()
            if i > 0:  # the first iteration warms up allocators and kernels
                fetches.append(t1 - t0)
                iters.append(t2 - t0)
    return iters, fetches


def _throughput(key: MasterKey, path: Path, reps: int) -> dict[str, Any]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from ..data import SealedDataset

    sealed_s: list[float] = []
    with SealedDataset(path, key) as ds:
        n, cr = len(ds), ds.chunk_records
        rec_bytes = [f.record_bytes for f in ds.fields]
        chunks = ds.num_chunks
    total = n * sum(rec_bytes)
    for _ in range(reps):
        with SealedDataset(path, key) as ds:  # a fresh cache each pass
            t0 = time.perf_counter()
            for c in range(chunks):
                ds.get_batch(np.arange(c * cr, min(n, (c + 1) * cr)))
            sealed_s.append(time.perf_counter() - t0)
    # Raw AES-GCM over the same bytes, chunked the same way (field by field).
    aes = AESGCM(os.urandom(32))
    sizes = [min(cr, n - c * cr) * rb for c in range(chunks) for rb in rec_bytes]
    plain = np.ones(max(sizes), dtype=np.uint8)
    cts = []
    for i, s in enumerate(sizes):
        ct = np.empty(s + TAG_SIZE, dtype=np.uint8)
        aes.encrypt_into(counter_nonce(i), plain[:s].data, b"", ct.data)
        cts.append(ct)
    raw_s: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i, (s, ct) in enumerate(zip(sizes, cts)):
            aes.decrypt_into(counter_nonce(i), ct.data, b"", plain[:s].data)
        raw_s.append(time.perf_counter() - t0)
    sealed_med, raw_med = median(sealed_s), median(raw_s)
    return {
        "dataset_bytes": total,
        "chunks": chunks,
        "chunk_records": cr,
        "sealed_pass_s": sealed_med,
        "raw_decrypt_s": raw_med,
        "sealed_gb_s": total / sealed_med / 1e9,
        "raw_gb_s": total / raw_med / 1e9,
        "sealed_pct_of_raw": 100.0 * raw_med / sealed_med,
    }


def run_sealed(cfg: BenchConfig, key: MasterKey, pm: Path, progress: Progress) -> dict[str, Any]:
    """Iteration time on sealed versus plain data, and decryption throughput."""
    from ..data import SealedSampler, seal_dataset

    arrays = synthetic_mnist(cfg.sealed_records, seed=1)
    path = pm / "sealed.pld"
    seal_dataset(path, key, arrays)
    plain = (torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["label"]))
    runs: dict[str, list[float]] = {"plain": [], "sealed": []}
    fetch: dict[str, list[float]] = {"plain": [], "sealed": []}
    try:
        from ..data import SealedDataset

        with SealedDataset(path, key) as ds:
            sampler = SealedSampler(ds, seed=0, shuffle="chunk")
            sampler.set_epoch(0)
            order = list(sampler.batches(cfg.overhead_batch, drop_last=True))
        per_run = cfg.sealed_steps + 1
        with progress.section("sealed", cfg.sealed_rounds * 2 + 1) as advance:
            for rnd in range(cfg.sealed_rounds):
                # Each round reads batches it has not read before (no warm cache).
                lo = (rnd * per_run) % max(1, len(order) - per_run)
                batches = order[lo : lo + per_run]
                for mode in ("plain", "sealed"):
                    it, fe = _train_run(cfg, key, path, plain, batches, mode == "sealed")
                    runs[mode] += it
                    fetch[mode] += fe
                    collect()
                    advance(f"round {rnd + 1}: {mode}")
            thr = _throughput(key, path, max(1, cfg.repeats))
            advance("decryption throughput")
    finally:
        path.unlink(missing_ok=True)
    it_med = {m: median(v) for m, v in runs.items()}
    fe_med = {m: median(v) for m, v in fetch.items()}
    return {
        "model": cfg.overhead_model,
        "batch": cfg.overhead_batch,
        "records": cfg.sealed_records,
        "iteration_s": it_med,
        "fetch_s": fe_med,
        "iteration_runs_s": runs,
        "overhead_pct": 100.0 * (it_med["sealed"] / it_med["plain"] - 1.0),
        "throughput": thr,
        "paper_overhead_pct": 20.0,
        "target": "at most 5% slower per iteration than plain memory",
        "target_pct": 5.0,
    }
