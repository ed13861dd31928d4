"""Crash consistency: every persist boundary of a save in the crash simulator, and real SIGKILLs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from plinius import mirror as mirror_mod
from plinius.crypto import MasterKey
from plinius.mirror import Mirror, _format
from plinius.testing import CrashSimRegion


def _contents(
    region: CrashSimRegion | bytes, key: MasterKey
) -> tuple[int, int | None, dict[str, bytes]]:
    """(generation, step, tensors as bytes) of what a region restores to."""
    r = CrashSimRegion.from_image(region) if isinstance(region, bytes) else region
    with Mirror(r, key, readonly=True) as m:
        info = m.info()
        tensors = {n: _raw(t) for n, t in m.read_tensors().items()}
    return info.generation, info.step, tensors


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _state(step: int) -> dict[str, Any]:
    """A state whose every tensor is determined by ``step``; it grows at step 2."""
    g = torch.Generator().manual_seed(step)
    st: dict[str, Any] = {"w": torch.randn(300, generator=g), "b": torch.randn(7, generator=g)}
    if step >= 2:  # like Adam's moments after the first step: new tensors, a bigger manifest
        st["m"] = [torch.randn(50, generator=g) for _ in range(40)]
    st["step"] = step
    return st


def test_every_persist_boundary_yields_the_old_or_the_new_generation(
    key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # small chunks so that one tensor spans several AES-GCM pieces
    monkeypatch.setattr(mirror_mod, "CHUNK_BYTES", 512)
    region = CrashSimRegion(0)
    m = Mirror(region, key)
    expected: dict[int, tuple[int | None, dict[str, bytes]]] = {0: (None, {})}
    checked = 0
    for gen, step in enumerate([1, 2, 3, 4], start=1):
        images: list[tuple[int, bytes]] = []
        old_size = region.size

        def collect(r: CrashSimRegion, images: list[tuple[int, bytes]] = images) -> None:
            for img in r.crash_images(exhaustive_limit=8, samples=16, seed=len(images)):
                images.append((r.persist_calls, img))

        region.on_persist = collect
        state = _state(step)
        m.save(state, step=step)
        region.on_persist = None
        _, _, new_tensors = _contents(region.image(), key)
        expected[gen] = (step, new_tensors)
        assert len({b for b, _ in images}) >= 5  # tensors, body, root, commit word, wipe
        committed_seen = set()
        for _, img in [*images, (0, region.persisted_image())]:
            g, s, tensors = _contents(img, key)
            # the old generation or the new one, whole: never an error, never a mix
            assert g in (gen - 1, gen)
            assert (s, tensors) == expected[g]
            committed_seen.add(g)
            checked += 1
            if g == gen - 1 and len(img) > old_size:
                # a crash before the commit may also leave the file at its old size
                assert _contents(img[:old_size], key)[0] == gen - 1
        assert committed_seen == {gen - 1, gen}
    m.close()
    assert checked > 300, checked


def test_a_torn_commit_word_is_impossible_and_a_damaged_one_is_caught(key: MasterKey) -> None:
    region = CrashSimRegion(0)
    with Mirror(region, key) as m:
        m.save(_state(1), step=1)
    img = bytearray(region.image())
    word = int.from_bytes(img[_format.COMMIT_OFFSET : _format.COMMIT_OFFSET + 8], "little")
    # every single-bit error of the commit word is detected (CRC-8)
    for bit in range(64):
        bad = bytearray(img)
        bad[_format.COMMIT_OFFSET : _format.COMMIT_OFFSET + 8] = (word ^ (1 << bit)).to_bytes(
            8, "little"
        )
        with pytest.raises(Exception, match=r"commit word|damaged|authentication"):
            _contents(bytes(bad), key)


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from plinius.crypto import MasterKey
    from plinius.mirror import Mirror
    key = MasterKey(bytes.fromhex(sys.argv[2]))
    def state(step):
        g = torch.Generator().manual_seed(step)
        return {"w": torch.randn(1 << 19, generator=g), "v": [torch.randn(1000, generator=g)
                for _ in range(step % 5 + 1)], "step": step}
    with Mirror(sys.argv[1], key) as m:
        start = m.info().step or 0
        print("ready", flush=True)
        for step in range(start + 1, start + 100000):
            m.save(state(step), step=step)
    """
)


@pytest.mark.slow
def test_sigkill_at_random_moments_always_reopens_to_a_committed_generation(shm_dir: Path) -> None:
    key = MasterKey.generate()
    path = shm_dir / "killed.plm"
    rng = random.Random(1234)
    steps_seen = []
    deadline = time.monotonic() + 30
    kills = 0
    while kills < 12 and time.monotonic() < deadline:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), key.raw_bytes().hex()],
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        with Mirror(path, key) as m:
            info = m.info()
            if info.generation == 0:
                continue
            step = info.step
            assert step is not None
            g = torch.Generator().manual_seed(step)
            n = step % 5 + 1
            want = {
                "w": torch.randn(1 << 19, generator=g),
                "v": [torch.randn(1000, generator=g) for _ in range(n)],
            }
            vs = [torch.zeros(1000) for _ in range(n)]
            target: dict[str, Any] = {"w": torch.zeros(1 << 19), "v": vs, "step": None}
            assert m.restore(target) == step
            assert torch.equal(target["w"], want["w"]) and target["step"] == step
            assert all(torch.equal(a, b) for a, b in zip(target["v"], want["v"]))
            steps_seen.append(step)
    assert kills >= 5 and len(steps_seen) >= 3
    assert steps_seen == sorted(steps_seen)  # never back in time
