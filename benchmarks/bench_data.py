"""Sealed-data benchmarks: decryption throughput, batch cost, CNN iteration overhead.

Run ``python benchmarks/bench_data.py [--quick] [--dir /dev/shm] [--json OUT]``.
Every number that is compared is measured in the same run, on the same data:

* ``decrypt_throughput``: one pass of ``get_batch`` over the whole dataset
  (chunk by chunk, every chunk decrypted once and its records copied out)
  against raw ``AESGCM.decrypt_into`` over the same ciphertext bytes, same
  chunk sizes, into a preallocated buffer: the physical limit here.
* ``batch_cost``: microseconds per ``get_batch`` of 128 records in the order
  of each shuffle mode (``False``, ``"chunk"``, ``"full"``), for several chunk
  sizes: the measurement behind the default chunk size.
* ``iteration_overhead``: a small CNN trained at batch 128 on MNIST-shaped
  records fetched from plain tensors in memory or from the sealed dataset,
  in the same index order, alternating runs; reports the ratio.

The functions are importable (``plinius bench`` may reuse them); none of them
asserts anything about the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from torch import nn

from plinius.crypto import TAG_SIZE, MasterKey, counter_nonce
from plinius.data import SealedDataset, SealedSampler, seal_dataset

__all__ = [
    "batch_cost",
    "decrypt_throughput",
    "iteration_overhead",
    "mnist_like",
    "small_cnn",
]


def mnist_like(records: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 28x28 images and int64 labels (the shapes of MNIST)."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, size=(records, 28, 28), dtype=np.uint8),
        "label": rng.integers(0, 10, size=records, dtype=np.int64),
    }


def small_cnn() -> nn.Module:
    """A small MNIST CNN in the style of the reference model (LeakyReLU, BatchNorm, 1x1 head)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 10, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


@contextmanager
def _sealed(
    directory: Path, key: MasterKey, arrays: dict[str, np.ndarray], chunk_records: int | None
) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix="bench-", suffix=".pld", dir=directory)
    os.close(fd)
    path = Path(name)
    try:
        seal_dataset(path, key, arrays, chunk_records=chunk_records, overwrite=True)
        yield path
    finally:
        path.unlink(missing_ok=True)


def _best(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def decrypt_throughput(
    path: Path, key: MasterKey, *, batch: int = 128, reps: int = 5
) -> dict[str, float | int]:
    """One pass of ``get_batch`` over the whole dataset versus raw ``AESGCM.decrypt_into``.

    ``per_chunk``: one ``get_batch`` per chunk (its records in order);
    ``batches``: sequential batches of ``batch`` records (what training reads
    with ``shuffle=False``). Each pass opens the dataset anew (cold cache), so
    every chunk is decrypted once. ``raw``: the same ciphertext sizes,
    distinct buffers, decrypted into one preallocated buffer.
    """
    with SealedDataset(path, key) as ds:
        n, r, chunks = len(ds), ds.chunk_records, ds.num_chunks
        rec = [f.record_bytes for f in ds.fields]
    total = n * sum(rec)
    per_chunk = [np.arange(c * r, min(n, (c + 1) * r)) for c in range(chunks)]
    batches = [np.arange(a, min(n, a + batch)) for a in range(0, n, batch)]

    def sealed_pass(order: list[np.ndarray]) -> Callable[[], None]:
        def run() -> None:
            with SealedDataset(path, key) as ds:
                for idx in order:
                    ds.get_batch(idx)

        return run

    aes = AESGCM(os.urandom(32))
    sizes = [len(idx) * rb for idx in per_chunk for rb in rec]
    buf = np.zeros(max(sizes), dtype=np.uint8)
    cts = []
    for i, s in enumerate(sizes):
        ct = np.empty(s + TAG_SIZE, dtype=np.uint8)
        aes.encrypt_into(counter_nonce(i), buf[:s], b"", ct)
        cts.append(ct)

    def raw_pass() -> None:
        for i, (s, ct) in enumerate(zip(sizes, cts, strict=True)):
            aes.decrypt_into(counter_nonce(i), ct, b"", buf[:s])

    chunk_s = _best(sealed_pass(per_chunk), reps)
    batch_s = _best(sealed_pass(batches), reps)
    raw_s = _best(raw_pass, reps)
    return {
        "bytes": total,
        "chunk_records": r,
        "chunks": chunks,
        "raw_gb_s": total / raw_s / 1e9,
        "per_chunk_gb_s": total / chunk_s / 1e9,
        "batches_gb_s": total / batch_s / 1e9,
        "per_chunk_vs_raw": raw_s / chunk_s,
        "batches_vs_raw": raw_s / batch_s,
    }


def batch_cost(
    path: Path, key: MasterKey, *, batch: int = 128, batches: int = 40, reps: int = 3
) -> dict[str, float]:
    """Microseconds per ``get_batch`` of ``batch`` records in each shuffle mode's order.

    The cache carries over from batch to batch, as in training.
    """
    out: dict[str, float] = {}
    for mode in (False, "chunk", "full"):
        with SealedDataset(path, key) as ds:
            sampler = SealedSampler(ds, seed=0, shuffle=mode)  # type: ignore[arg-type]
            order = list(sampler.batches(batch, drop_last=True))[:batches]

        def run(order: list[list[int]] = order) -> None:
            with SealedDataset(path, key) as ds:
                for idx in order:
                    ds.get_batch(idx)

        out[str(mode).lower()] = _best(run, reps) / len(order) * 1e6
    return out


def iteration_overhead(
    path: Path,
    key: MasterKey,
    arrays: dict[str, np.ndarray],
    *,
    batch: int = 128,
    steps: int = 20,
    rounds: int = 3,
    device: str = "cpu",
    model_factory: Callable[[], nn.Module] = small_cnn,
) -> dict[str, Any]:
    """Training-iteration time of a CNN (``model_factory``) on sealed versus plain in-memory data.

    Both read host memory (plain: indexing tensors; sealed: ``get_batch``) and
    move the batch to ``device``; on a GPU the step is short, so the fetch
    weighs more there than on a CPU.
    """
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    plain_x = torch.from_numpy(arrays["image"])
    plain_y = torch.from_numpy(arrays["label"])
    with SealedDataset(path, key) as ds:
        sampler = SealedSampler(ds, seed=0, shuffle="chunk")
        order = list(sampler.batches(batch, drop_last=True))
    times: dict[str, list[float]] = {"plain": [], "sealed": []}
    fetch: dict[str, list[float]] = {"plain": [], "sealed": []}
    per_round = steps + 1
    for rnd in range(rounds):
        lo = (rnd * per_round) % max(1, len(order) - per_round)
        batches = order[lo : lo + per_round]  # unread batches: no warm cache from before
        for mode in ("plain", "sealed"):
            torch.manual_seed(0)
            model = model_factory().to(dev)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            with SealedDataset(path, key) as ds:
                for i, idx in enumerate(batches):
                    t0 = time.perf_counter()
                    if mode == "sealed":
                        x, y = ds.get_batch(idx)
                    else:
                        ti = torch.as_tensor(idx)
                        x, y = plain_x[ti], plain_y[ti]
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    t1 = time.perf_counter()
                    logits = model(x.unsqueeze(1).float().div_(255.0))
                    loss = nn.functional.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sync()
                    t2 = time.perf_counter()
                    if i:  # the first step warms allocators and kernels
                        times[mode].append(t2 - t0)
                        fetch[mode].append(t1 - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "device": str(dev),
        "batch": batch,
        "iteration_ms": {m: v * 1e3 for m, v in med.items()},
        "fetch_us": {m: statistics.median(v) * 1e6 for m, v in fetch.items()},
        "sealed_over_plain": med["sealed"] / med["plain"],
    }


def _model_factory(reference_mb: float | None) -> Callable[[], nn.Module]:
    if reference_mb is None:
        return small_cnn
    from plinius.models import reference_cnn

    return lambda: reference_cnn(reference_mb)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run all three and print a JSON report (and write it with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer records and repetitions")
    ap.add_argument(
        "--dir", type=Path, default=Path("/dev/shm" if Path("/dev/shm").is_dir() else ".")
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cpu", help="where the CNN trains (cpu, cuda)")
    ap.add_argument(
        "--reference-mb",
        type=float,
        default=None,
        help="train plinius' reference CNN of this many MB instead of the small CNN",
    )
    args = ap.parse_args(argv)
    records = 10_000 if args.quick else 60_000
    reps = 2 if args.quick else 5
    key = MasterKey.generate()
    arrays = mnist_like(records)
    report: dict[str, Any] = {
        "records": records,
        "dir": str(args.dir),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    with _sealed(args.dir, key, arrays, None) as path:
        report["throughput"] = decrypt_throughput(path, key, reps=reps)
        report["iteration"] = iteration_overhead(
            path,
            key,
            arrays,
            steps=8 if args.quick else 20,
            rounds=2 if args.quick else 3,
            device=args.device,
            model_factory=_model_factory(args.reference_mb),
        )
        report["iteration"]["model"] = (
            f"reference_cnn({args.reference_mb:g} MB)" if args.reference_mb else "small_cnn"
        )
    sweep = {}
    for chunk_bytes in (4096, 16384, 65536, 262144):
        r = max(1, chunk_bytes // (28 * 28 + 8))
        with _sealed(args.dir, key, arrays, r) as path:
            sweep[chunk_bytes] = {
                "chunk_records": r,
                "batch_us": batch_cost(path, key, reps=reps),
                "batches_gb_s": decrypt_throughput(path, key, reps=reps)["batches_gb_s"],
            }
    report["chunk_sweep"] = sweep
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
