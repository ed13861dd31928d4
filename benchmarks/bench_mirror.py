"""Mirror save/restore throughput against raw AES-GCM and an encrypted SSD checkpoint.

    python benchmarks/bench_mirror.py            # 10, 50, 100, 300 MB states
    python benchmarks/bench_mirror.py --quick    # 10 and 50 MB, fewer repeats

Prints, per state size: mirror save and restore (median seconds, GB/s), raw
``AESGCM.encrypt_into``/``decrypt_into`` over the same bytes, the encrypted SSD
checkpoint (torch.save to a buffer, AES-256-GCM, write a temp file, fsync,
rename, fsync the directory; and back: read, decrypt, torch.load,
load_state_dict), the speed-ups, the peak extra anonymous memory of a save and
of a restore (as % of the state), and how much of an async save hides behind
a forward/backward pass of the same model. The functions are importable (for
``plinius bench``). Ratios within one run are what matter; absolute numbers
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from plinius.crypto import MasterKey
from plinius.mirror import CHUNK_BYTES, Mirror

MB = 1 << 20


@dataclass
class Row:
    """One state size's results."""

    mb: int
    state_bytes: int
    save_s: float
    restore_s: float
    raw_encrypt_s: float
    raw_decrypt_s: float
    ssd_save_s: float
    ssd_restore_s: float
    save_peak_pct: float
    restore_peak_pct: float
    async_hidden: float

    @property
    def save_vs_raw(self) -> float:
        return self.raw_encrypt_s / self.save_s

    @property
    def save_speedup(self) -> float:
        return self.ssd_save_s / self.save_s

    @property
    def restore_speedup(self) -> float:
        return self.ssd_restore_s / self.restore_s


def make_model(mb: int, width: int = 1024) -> torch.nn.Module:
    """An MLP of about ``mb`` MB of float32 parameters."""
    per_layer = (width * width + width) * 4
    layers: list[torch.nn.Module] = []
    for _ in range(max(1, round(mb * MB / per_layer))):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def make_state(mb: int) -> dict[str, Any]:
    """A training state: the model and an SGD-with-momentum optimizer after one step.

    ``mb`` is the size of the model; with momentum buffers the state is twice that.
    """
    torch.manual_seed(0)
    model = make_model(mb // 2 or 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(8, 1024)).sum().backward()
    opt.step()
    return {"model": model, "optim": opt, "step": 1}


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of tensor data in the state."""
    from plinius._state import flatten

    return sum(s.nbytes for s in flatten(state)[1])


def _median(f: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def raw_aead(nbytes: int, repeats: int) -> tuple[float, float]:
    """Median seconds of raw encrypt_into / decrypt_into over ``nbytes`` (mirror-sized chunks)."""
    aes = AESGCM(os.urandom(32))
    src = bytearray(os.urandom(min(nbytes, 1 << 24))) * max(1, nbytes // (1 << 24))
    src += bytes(nbytes - len(src))
    dst = bytearray(nbytes + 16 * (nbytes // CHUNK_BYTES + 1))
    mv_src, mv_dst = memoryview(src), memoryview(dst)
    nonce = bytes(12)
    pieces = [(o, min(CHUNK_BYTES, nbytes - o)) for o in range(0, nbytes, CHUNK_BYTES)]

    def enc() -> None:
        for i, (o, n) in enumerate(pieces):
            d = o + 16 * i
            aes.encrypt_into(nonce, mv_src[o : o + n], b"", mv_dst[d : d + n + 16])

    def dec() -> None:
        for i, (o, n) in enumerate(pieces):
            d = o + 16 * i
            aes.decrypt_into(nonce, mv_dst[d : d + n + 16], b"", mv_src[o : o + n])

    enc()
    return _median(enc, repeats), _median(dec, repeats)


def ssd_checkpoint(state: dict[str, Any], directory: Path, repeats: int) -> tuple[float, float]:
    """Median seconds of an encrypted checkpoint on disk: save, then restore."""
    aes = AESGCM(os.urandom(32))
    path = directory / "ckpt.enc"

    def save() -> None:
        buf = io.BytesIO()
        torch.save(
            {"model": state["model"].state_dict(), "optim": state["optim"].state_dict()}, buf
        )
        nonce = os.urandom(12)
        blob = nonce + aes.encrypt(nonce, buf.getbuffer(), b"ckpt")
        tmp = directory / "ckpt.tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def restore() -> None:
        blob = path.read_bytes()
        plain = aes.decrypt(blob[:12], blob[12:], b"ckpt")
        ck = torch.load(io.BytesIO(plain), weights_only=True)
        state["model"].load_state_dict(ck["model"])
        state["optim"].load_state_dict(ck["optim"])

    save()
    s = _median(save, repeats)
    r = _median(restore, repeats)
    path.unlink(missing_ok=True)
    return s, r


def _rss_anon() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_memory(f: Callable[[], Any]) -> int:
    """Peak growth of anonymous resident memory while ``f`` runs (sampled every ~0.5 ms)."""
    base = _rss_anon()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    try:
        f()
    finally:
        done.set()
        t.join()
    return max(0, max(peak, _rss_anon()) - base)


def async_overlap(state: dict[str, Any], mirror: Mirror, repeats: int) -> float:
    """Fraction of a save hidden behind a forward/backward pass (0: none, 1: all)."""
    model = state["model"]
    x = torch.randn(64, 1024)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    fwd_bwd()
    f = _median(fwd_bwd, repeats)
    s = _median(lambda: mirror.save(state, step=1), repeats)

    def both() -> None:
        pending = mirror.save_async(state, step=1)
        fwd_bwd()
        pending.wait()

    t = _median(both, repeats)
    return max(0.0, min(1.0, (f + s - t) / s))


def bench_size(mb: int, pm_dir: Path, ssd_dir: Path, repeats: int) -> Row:
    """All measurements for a state of about ``mb`` MB."""
    key = MasterKey.generate()
    state = make_state(mb)
    nbytes = state_bytes(state)
    path = pm_dir / f"bench-{mb}.plm"
    try:
        with Mirror(path, key) as m:
            m.save(state, step=0)  # lay the file out once, as training does
            save_s = _median(lambda: m.save(state, step=1), repeats)
            restore_s = _median(lambda: m.restore(state), repeats)
            save_peak = peak_extra_memory(lambda: m.save(state, step=2))
            restore_peak = peak_extra_memory(lambda: m.restore(state))
            hidden = async_overlap(state, m, repeats)
    finally:
        path.unlink(missing_ok=True)
    enc, dec = raw_aead(nbytes, repeats)
    ssd_s, ssd_r = ssd_checkpoint(state, ssd_dir, repeats)
    return Row(mb, nbytes, save_s, restore_s, enc, dec, ssd_s, ssd_r,
               100 * save_peak / nbytes, 100 * restore_peak / nbytes, hidden)  # fmt: skip


def report(rows: list[Row]) -> str:
    """A plain-text table of the rows."""
    head = (
        f"{'MB':>5} {'save s':>8} {'GB/s':>6} {'rest s':>8} {'GB/s':>6} {'raw enc':>7} "
        f"{'save/raw':>8} {'ssd save':>8} {'ssd rest':>8} {'x save':>6} {'x rest':>6} "
        f"{'mem s%':>6} {'mem r%':>6} {'async':>6}"
    )
    lines = [head]
    for r in rows:
        gb = r.state_bytes / 1e9
        lines.append(
            f"{r.state_bytes / MB:5.0f} {r.save_s:8.4f} {gb / r.save_s:6.2f} {r.restore_s:8.4f} "
            f"{gb / r.restore_s:6.2f} {gb / r.raw_encrypt_s:7.2f} {r.save_vs_raw:8.2f} "
            f"{r.ssd_save_s:8.4f} {r.ssd_restore_s:8.4f} {r.save_speedup:6.1f} "
            f"{r.restore_speedup:6.1f} {r.save_peak_pct:6.1f} {r.restore_peak_pct:6.1f} "
            f"{r.async_hidden:6.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10 and 50 MB, 3 repeats")
    p.add_argument("--sizes", type=int, nargs="*", help="state sizes in MB")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--pm-dir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--ssd-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = p.parse_args(argv)
    sizes = args.sizes or ([10, 50] if args.quick else [10, 50, 100, 300])
    repeats = args.repeats or (3 if args.quick else 5)
    rows = []
    with (
        tempfile.TemporaryDirectory(dir=args.pm_dir) as pm,
        tempfile.TemporaryDirectory(dir=args.ssd_dir) as ssd,
    ):
        for mb in sizes:
            rows.append(bench_size(mb, Path(pm), Path(ssd), repeats))
    print(f"torch threads {torch.get_num_threads()}, pm {args.pm_dir}, ssd {args.ssd_dir}")
    print(report(rows))
    return rows


if __name__ == "__main__":
    main()
