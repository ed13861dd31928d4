"""plinius.dcp's write path: threads change no byte, failures clean up, superseded files' cache."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import plinius._fsutil
import plinius._workers
import plinius.dcp
from plinius.crypto import MasterKey
from plinius.dcp import METADATA_NAME, PliniusWriter, _format, _write
from plinius.errors import ConfigError, StorageError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": {f"t{i}": torch.randn(n, generator=gen) for i, n in enumerate((5, 700, 3, 2500, 1))},
        "strided": torch.arange(3000, dtype=torch.bfloat16).reshape(30, 100)[:, ::2],
        "empty": torch.zeros(0),
        "step": seed,
        "notes": {"name": "run", "losses": [0.5, 0.25]},
    }


def _blank() -> dict[str, Any]:
    s = _state(99)
    for v in [*s["w"].values(), s["strided"]]:
        v.zero_()
    s["strided"] = torch.zeros(30, 50, dtype=torch.bfloat16)
    s["notes"] = {"name": None, "losses": None}
    return s


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Pieces of 1000 bytes, batches of 3000, threads at any size: every path runs small.

    Returns the names of the threads that sealed batches.
    """
    monkeypatch.setattr(_format, "PIECE_BYTES", 1000)
    monkeypatch.setattr(_write, "BATCH_BYTES", 3000)
    monkeypatch.setattr(plinius._workers, "PARALLEL_MIN_BYTES", 0)
    sealers: list[str] = []
    seal = _write._seal

    def noted(*args: Any) -> None:
        sealers.append(threading.current_thread().name)
        seal(*args)

    monkeypatch.setattr(_write, "_seal", noted)
    return sealers


def test_the_thread_count_changes_no_byte_of_the_data_file(
    tmp_path: Path, key: MasterKey, small_pieces: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One checkpoint id for every save, so that the files can be compared.
    monkeypatch.setattr(plinius.dcp.os, "urandom", lambda n: bytes(range(n)))
    want = _state(1)
    files = {}
    for threads in (1, 2, 4):
        d = tmp_path / f"t{threads}"
        small_pieces.clear()
        with plinius.dcp.plinius_errors():
            torch.distributed.checkpoint.save(
                want, storage_writer=PliniusWriter(d, key, thread_count=threads), no_dist=True
            )
        (data,) = d.glob("*.pdcp")
        files[threads] = (data.name, data.read_bytes())
        got = _blank()
        plinius.dcp.load(got, d, key, no_dist=True)
        assert all(torch.equal(got["w"][k], v) for k, v in want["w"].items())
        assert torch.equal(got["strided"], want["strided"])
        assert got["notes"] == want["notes"] and got["step"] == want["step"]
        # Several batches were sealed, and with threads off the caller's thread.
        assert len(small_pieces) > 3
        on_pool = any(name.startswith("plinius-aead") for name in small_pieces)
        assert on_pool == (threads > 1)
    assert files[1] == files[2] == files[4]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_thread_count_is_refused(tmp_path: Path, key: MasterKey, bad: Any) -> None:
    with pytest.raises(ConfigError, match="thread_count must be a positive integer"):
        PliniusWriter(tmp_path, key, thread_count=bad)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_failed_write_removes_its_file_and_keeps_the_checkpoint(
    tmp_path: Path,
    key: MasterKey,
    small_pieces: list[str],
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
) -> None:
    d = tmp_path / "c"
    plinius.dcp.save(_state(1), d, key, no_dist=True)
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    calls = []
    write_all = _write._write_all

    def full_disk(fd: int, data: Any) -> None:
        calls.append(len(data))
        if len(calls) > 2:  # the header and a batch went through
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(_write, "_write_all", full_disk)
    writer = PliniusWriter(d, key, thread_count=threads)
    with (
        pytest.raises(StorageError, match="cannot write DCP data file"),
        plinius.dcp.plinius_errors(),
    ):
        torch.distributed.checkpoint.save(_state(2), storage_writer=writer, no_dist=True)
    assert len(calls) == 3
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before
    assert (d / METADATA_NAME).exists()


def test_a_save_drops_the_cache_of_the_files_it_supersedes_and_nothing_else(
    tmp_path: Path, key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped: list[Path] = []
    monkeypatch.setattr(_write, "drop_cached", dropped.append)
    d = tmp_path / "c"
    plinius.dcp.save(_state(1), d, key, no_dist=True)
    assert dropped == []  # nothing committed yet
    (first,) = d.glob("*.pdcp")
    plinius.dcp.save(_state(2), d, key, no_dist=True)
    assert dropped == [first]
    assert not first.exists()  # removed after the commit, as before


def test_drop_cached_keeps_the_bytes_and_ignores_a_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100_000)
    plinius._fsutil.drop_cached(f)
    assert f.read_bytes() == b"x" * 100_000
    plinius._fsutil.drop_cached(tmp_path / "missing")  # best effort: no error
