"""Bad input at every boundary: each bad form gives a clear error and loses nothing.

Table-driven, one row per input and bad form, acting as an attacker or a
careless user would. Every row asserts the error class (or the exit code for
the command line: 1 for an error, on one line; 2 for a usage error; never a
traceback), a key phrase of the message, and that nothing was lost: every
file in the workspace (the key, the sealed dataset, the mirror, the inputs) is
byte for byte what it was, and no file appeared (no temporary file left, no
half-written output). A full file system is simulated with a 1 MiB tmpfs
(skipped where mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from click.testing import Result

from plinius.bench.crashtest import PriceTrace
from plinius.counters import FileCounter
from plinius.counters.tpm import TPMCounter
from plinius.crypto import MasterKey
from plinius.darknet import load_cfg, parse_input_spec
from plinius.data import SealedDataset, seal_dataset
from plinius.data.sources import load_csv, load_idx, load_npz
from plinius.errors import (
    ConfigError,
    DarknetConfigError,
    FormatError,
    IntegrityError,
    KeyFileError,
    PliniusError,
    StorageError,
    WrongKeyError,
)
from plinius.mirror import Mirror
from plinius.tee.policy import Policy
from plinius.tee.protocol import load_identity
from plinius.tee.sealing import unseal_master_key
from tests.conftest import run_cli

# ---------------------------------------------------------------- the workspace


@dataclass
class W:
    """A job's files: a key, a sealed dataset, a mirror with one saved step, and oddities."""

    dir: Path
    key: MasterKey
    keyfile: Path
    data: Path
    mirror: Path
    fifo: Path
    subdir: Path
    text: Path
    holders: list[Any] = field(default_factory=list)

    def file(self, name: str, data: bytes | str, mode: int = 0o600) -> Path:
        p = self.dir / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        p.chmod(mode)
        return p

    def copy(self, src: Path, name: str) -> Path:
        dst = self.dir / name
        shutil.copyfile(src, dst)
        return dst


@pytest.fixture
def w(shm_dir: Path) -> Iterator[W]:
    key = MasterKey(b"w" * 32)
    keyfile = shm_dir / "owner.key"
    key.save(keyfile)
    data = shm_dir / "train.pld"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(40, 8, 8), dtype=np.uint8)
    seal_dataset(data, key, {"image": x, "label": (x[:, 0, 0] > 127).astype(np.int64)})
    mirror = shm_dir / "job.plm"
    with Mirror(mirror, key) as m:
        m.save({"w": torch.arange(6.0)}, step=1)
    fifo = shm_dir / "fifo"
    os.mkfifo(fifo)
    subdir = shm_dir / "subdir"
    subdir.mkdir()
    text = shm_dir / "notes.txt"
    text.write_text("not a plinius file\n")
    ws = W(shm_dir, key, keyfile, data, mirror, fifo, subdir, text)
    yield ws
    for h in ws.holders:
        h.close()


def snapshot(d: Path) -> dict[str, Any]:
    """Every entry under ``d``: bytes and mode of files, kind of the rest."""
    out: dict[str, Any] = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(d))
        if stat.S_ISREG(st.st_mode):
            out[rel] = (stat.S_IMODE(st.st_mode), p.read_bytes())
        else:
            out[rel] = stat.S_IFMT(st.st_mode)
    return out


def assert_nothing_lost(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert sorted(after) == sorted(before), "files appeared or disappeared"
    for name, was in before.items():
        assert after[name] == was, f"{name} changed"


# ---------------------------------------------------------------- API rows


@dataclass(frozen=True)
class Bad:
    """One bad input: ``make`` writes what it needs and returns the action that must fail."""

    id: str
    make: Callable[[W], Callable[[], object]]
    error: type[PliniusError]
    phrase: str


def _with(
    make_input: Callable[[W], Path], act: Callable[[W, Path], object]
) -> Callable[[W], Callable[[], object]]:
    """A row's ``make``: write the input first (before the snapshot), then act on it."""

    def make(w: W) -> Callable[[], object]:
        p = make_input(w)
        return lambda: act(w, p)

    return make


def _idx(dtype_code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    head = bytes([0, 0, dtype_code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    return head + payload


def _flip(p: Path, offset: int) -> Path:
    b = bytearray(p.read_bytes())
    b[offset] ^= 0x01
    p.write_bytes(bytes(b))
    return p


def _truncated(w: W, src: Path, n: int, name: str) -> Path:
    return w.file(name, src.read_bytes()[:n])


def _load_key(w: W, p: Path) -> object:
    return MasterKey.load(p)


def _open_mirror(w: W, p: Path) -> object:
    return Mirror(p, w.key)


def _open_dataset(w: W, p: Path) -> object:
    return SealedDataset(p, w.key)


def _seal_npz(w: W, p: Path) -> object:
    return _seal_from(lambda: load_npz(p), w)


def _locked(w: W) -> Callable[[], object]:
    w.holders.append(Mirror(w.mirror, w.key))  # another writer holds the mirror
    return lambda: Mirror(w.mirror, w.key)


def _mirror_version(w: W) -> Callable[[], object]:
    p = w.copy(w.mirror, "v2.plm")
    b = bytearray(p.read_bytes())
    b[8:12] = struct.pack("<I", 2)
    p.write_bytes(bytes(b))
    return lambda: Mirror(p, w.key)


def _seal_from(loader: Callable[[], dict[str, Any]], w: W) -> object:
    return seal_dataset(w.dir / "out.pld", w.key, loader())


def _npz(w: W, **arrays: Any) -> Path:
    p = w.dir / "in.npz"
    with open(p, "wb") as f:
        np.savez(f, **arrays)
    return p


def _lying_npz(w: W) -> Path:
    """An archive whose array header declares 8 TiB over 64 bytes of data."""
    import io
    import zipfile

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": "<f8", "fortran_order": False, "shape": (1 << 40,)}
    )
    p = w.dir / "lies.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", head.getvalue() + bytes(64))
    return p


def _csv(w: W, text: str | bytes) -> Callable[[], object]:
    p = w.file("in.csv", text)
    return lambda: _seal_from(lambda: load_csv(p, "label"), w)


def _idx_pair(w: W, images: bytes, labels: bytes) -> Callable[[], object]:
    pi, pl = w.file("img.idx", images), w.file("lbl.idx", labels)
    return lambda: _seal_from(lambda: load_idx(pi, pl), w)


_IMG = _idx(0x08, (2, 2, 2), bytes(8))
_LBL = _idx(0x08, (2,), b"\x00\x01")


def _cfg(w: W, text: str | bytes) -> Callable[[], object]:
    p = w.file("net.cfg", text)
    return lambda: load_cfg(p)


_NET = "[net]\nheight=8\nwidth=8\nchannels=1\n"


def _trace(w: W, text: str | bytes) -> Callable[[], object]:
    p = w.file("trace.csv", text)
    return lambda: PriceTrace.load(p)


def _counter(w: W, text: str) -> Callable[[], object]:
    c = FileCounter(w.file("ctr", text))
    return lambda: Mirror(w.mirror, w.key, counter=c)  # refused before any write


def _policy(w: W, text: str | bytes) -> Callable[[], object]:
    p = w.file("policy.toml", text)
    return lambda: Policy.load(p)


API_ROWS = [
    # -- key files (MasterKey.load; every command's --key)
    Bad("key-missing", lambda w: lambda: MasterKey.load(w.dir / "none.key"), KeyFileError,
        "plinius keygen"),
    Bad("key-directory", lambda w: lambda: MasterKey.load(w.subdir), KeyFileError,
        "not a regular file"),
    Bad("key-fifo", lambda w: lambda: MasterKey.load(w.fifo), KeyFileError, "not a regular file"),
    Bad("key-empty", _with(lambda w: w.file("e.key", b""), _load_key), KeyFileError,
        "holds 0 bytes, not 32"),
    Bad("key-short", _with(lambda w: w.file("s.key", b"k" * 31), _load_key), KeyFileError,
        "holds 31 bytes"),
    Bad("key-long", _with(lambda w: w.file("l.key", b"k" * 33), _load_key), KeyFileError,
        "holds 33 bytes"),
    Bad("key-group-readable", _with(lambda w: w.file("o.key", b"k" * 32, 0o640), _load_key),
        KeyFileError, "chmod 600"),
    Bad("key-is-the-dataset", lambda w: lambda: MasterKey.load(w.data), KeyFileError,
        "not a plinius master key"),
    Bad("key-save-over-existing", lambda w: lambda: MasterKey.generate().save(w.keyfile),
        KeyFileError, "refusing to overwrite"),
    Bad("key-save-missing-dir", lambda w: lambda: MasterKey.generate().save(w.dir / "no" / "k"),
        StorageError, "directory exist"),
    # -- mirror files (Mirror; train, evaluate, inspect, export)
    Bad("mirror-directory", lambda w: lambda: Mirror(w.subdir, w.key), StorageError,
        "not a regular file"),
    Bad("mirror-directory-ro", lambda w: lambda: Mirror(w.subdir, w.key, readonly=True),
        StorageError, "not a regular file"),
    Bad("mirror-fifo", lambda w: lambda: Mirror(w.fifo, w.key), StorageError,
        "not a regular file"),
    Bad("mirror-empty", _with(lambda w: w.file("e.plm", b""), _open_mirror), IntegrityError,
        "is empty"),
    Bad("mirror-is-a-dataset", lambda w: lambda: Mirror(w.data, w.key), FormatError,
        "sealed dataset, not a mirror"),
    Bad("mirror-is-text", lambda w: lambda: Mirror(w.text, w.key), FormatError,
        "not a plinius mirror"),
    Bad("mirror-header-only", _with(lambda w: _truncated(w, w.mirror, 100, "t.plm"),
        _open_mirror), IntegrityError, "truncated"),
    Bad("mirror-truncated", _with(lambda w: _truncated(w, w.mirror, 13000, "t.plm"),
        _open_mirror), IntegrityError, "truncated"),
    Bad("mirror-commit-word-bit", _with(lambda w: _flip(w.copy(w.mirror, "c.plm"), 0x100),
        _open_mirror), IntegrityError, "commit word"),
    Bad("mirror-future-version", _mirror_version, FormatError, "format version 2"),
    Bad("mirror-wrong-key", lambda w: lambda: Mirror(w.mirror, MasterKey(b"x" * 32)),
        WrongKeyError, "another master key"),
    Bad("mirror-missing-ro", lambda w: lambda: Mirror(w.dir / "none.plm", w.key, readonly=True),
        StorageError, "does not exist"),
    Bad("mirror-missing-dir", lambda w: lambda: Mirror(w.dir / "no" / "m.plm", w.key),
        StorageError, "does not exist"),
    Bad("mirror-locked", _locked, StorageError, "in use by another process"),
    Bad("mirror-counter-garbage", lambda w: _counter(w, "seven\n"), FormatError,
        "does not hold a counter value"),
    Bad("mirror-counter-5000-digits", lambda w: _counter(w, "9" * 5000), FormatError,
        "does not hold a counter value"),
    Bad("mirror-counter-negative", lambda w: _counter(w, "-1"), FormatError,
        "does not hold a counter value"),
    Bad("mirror-counter-is-a-directory",
        lambda w: lambda: Mirror(w.mirror, w.key, counter=FileCounter(w.subdir)), FormatError,
        "not a regular file"),
    # -- sealed datasets (SealedDataset; train --data, evaluate, inspect)
    Bad("dataset-directory", lambda w: lambda: SealedDataset(w.subdir, w.key), StorageError,
        "not a regular file"),
    Bad("dataset-fifo", lambda w: lambda: SealedDataset(w.fifo, w.key), StorageError,
        "not a regular file"),
    Bad("dataset-empty", _with(lambda w: w.file("e.pld", b""), _open_dataset), FormatError,
        "is empty"),
    Bad("dataset-is-a-mirror", lambda w: lambda: SealedDataset(w.mirror, w.key), FormatError,
        "plinius mirror, not a sealed dataset"),
    Bad("dataset-is-the-key", lambda w: lambda: SealedDataset(w.keyfile, w.key), FormatError,
        "bad magic"),
    Bad("dataset-prefix-only", _with(lambda w: _truncated(w, w.data, 20, "t.pld"),
        _open_dataset), IntegrityError, "truncated"),
    Bad("dataset-truncated", _with(lambda w: _truncated(w, w.data, 700, "t.pld"),
        _open_dataset), IntegrityError, "truncated"),
    Bad("dataset-header-bit", _with(lambda w: _flip(w.copy(w.data, "h.pld"), 60),
        _open_dataset), IntegrityError, "failed authentication"),
    Bad("dataset-wrong-key", lambda w: lambda: SealedDataset(w.data, MasterKey(b"x" * 32)),
        WrongKeyError, "another key"),
    Bad("dataset-id-not-hex", lambda w: lambda: SealedDataset(w.data, w.key, expect_id="xyz"),
        ConfigError, "32 hex digits"),
    Bad("dataset-id-other", lambda w: lambda: SealedDataset(w.data, w.key, expect_id="0" * 32),
        IntegrityError, "not the required"),
    Bad("seal-over-existing", lambda w: lambda: seal_dataset(
        w.data, w.key, {"x": np.zeros((2, 2))}), StorageError, "already exists"),
    Bad("seal-missing-dir", lambda w: lambda: seal_dataset(
        w.dir / "no" / "d.pld", w.key, {"x": np.zeros((2, 2))}), StorageError, "does not exist"),
    Bad("seal-uneven-records", lambda w: lambda: seal_dataset(
        w.dir / "d.pld", w.key, {"x": np.zeros((2, 2)), "y": np.zeros(3)}), ConfigError,
        "same number of records"),
    Bad("seal-object-dtype", lambda w: lambda: seal_dataset(
        w.dir / "d.pld", w.key, {"x": np.array([None, 1])}), ConfigError, "unsupported dtype"),
    # -- sources of `plinius seal`: NPZ
    Bad("npz-not-a-zip", _with(lambda w: w.file("bad.npz", b"PK\x03\x04junk"), _seal_npz),
        ConfigError, "not a readable .npz"),
    Bad("npz-strings", _with(lambda w: _npz(w, a=np.array(["x", "y"])), _seal_npz),
        ConfigError, "unsupported dtype"),
    Bad("npz-pickled-objects", _with(lambda w: _npz(w, a=np.array([{}, None], dtype=object)),
        _seal_npz), ConfigError, "Object arrays cannot be loaded"),
    Bad("npz-uneven", _with(lambda w: _npz(w, a=np.zeros((3, 2)), b=np.zeros(4)), _seal_npz),
        ConfigError, "same first dimension"),
    Bad("npz-shape-lies", _with(_lying_npz, _seal_npz), ConfigError, "an array"),
    Bad("npz-fifo", _with(lambda w: w.fifo, _seal_npz), ConfigError, "not a regular file"),
    # -- IDX
    Bad("idx-bad-magic", lambda w: _idx_pair(w, b"\x01\x02\x03\x04" + bytes(8), _LBL),
        ConfigError, "not an IDX file"),
    Bad("idx-truncated", lambda w: _idx_pair(w, _IMG[:-3], _LBL), ConfigError, "truncated"),
    Bad("idx-dims-lie", lambda w: _idx_pair(w, _idx(0x08, (65535, 4096, 4096), bytes(8)), _LBL),
        ConfigError, "truncated IDX file"),
    Bad("idx-trailing-bytes", lambda w: _idx_pair(w, _IMG + b"!", _LBL), ConfigError,
        "bytes after"),
    Bad("idx-float-labels", lambda w: _idx_pair(w, _IMG, _idx(0x0D, (2,), bytes(8))),
        ConfigError, "labels must be integers"),
    Bad("idx-count-mismatch", lambda w: _idx_pair(w, _IMG, _idx(0x08, (3,), bytes(3))),
        ConfigError, "holds 2 images but"),
    Bad("idx-corrupt-gzip", lambda w: _idx_pair(w, gzip.compress(_IMG)[:-12] + b"garbage!!!!!",
        _LBL), ConfigError, "gzip"),
    # -- CSV
    Bad("csv-empty", lambda w: _csv(w, ""), ConfigError, "is empty"),
    Bad("csv-no-label-column", lambda w: _csv(w, "a,b\n1,2\n"), ConfigError, "no column 'label'"),
    Bad("csv-ragged-row", lambda w: _csv(w, "a,label\n1,2\n3\n"), ConfigError,
        "line 3: 1 values"),
    Bad("csv-not-a-number", lambda w: _csv(w, "a,label\nx,1\n"), ConfigError, "is not a number"),
    Bad("csv-infinite", lambda w: _csv(w, "a,label\ninf,1\n"), ConfigError, "not a finite"),
    Bad("csv-fractional-label", lambda w: _csv(w, "a,label\n1,1.5\n"), ConfigError,
        "not an integer class label"),
    Bad("csv-nul-byte", lambda w: _csv(w, b"a,label\n1\x00,2\n"), ConfigError, "is not a number"),
    Bad("csv-not-utf8", lambda w: _csv(w, b"a,label\n\xff,1\n"), ConfigError, "not UTF-8"),
    Bad("csv-header-only", lambda w: _csv(w, "a,label\n"), ConfigError, "no data rows"),
    Bad("csv-duplicate-column", lambda w: _csv(w, "a,a,label\n1,2,3\n"), ConfigError,
        "appears twice"),
    # -- Darknet cfgs (plinius models --cfg, train --model X.cfg)
    Bad("cfg-not-utf8", lambda w: _cfg(w, b"[net]\n\xff\xfe"), DarknetConfigError,
        "not a text file"),
    Bad("cfg-fifo", lambda w: lambda: load_cfg(w.fifo), DarknetConfigError,
        "not a regular file"),
    Bad("cfg-device", lambda w: lambda: load_cfg("/dev/zero"), DarknetConfigError,
        "not a regular file"),
    Bad("cfg-too-large", lambda w: _cfg(w, "#" * ((16 << 20) + 1)), DarknetConfigError,
        "too large"),
    Bad("cfg-no-sections", lambda w: _cfg(w, "# nothing\n"), DarknetConfigError, "no sections"),
    Bad("cfg-key-before-section", lambda w: _cfg(w, "height=8\n[net]\n"), DarknetConfigError,
        "line 1"),
    Bad("cfg-bad-header", lambda w: _cfg(w, "[net\n"), DarknetConfigError,
        "malformed section header"),
    Bad("cfg-duplicate-key", lambda w: _cfg(w, _NET + "height=9\n"), DarknetConfigError,
        "given twice"),
    Bad("cfg-unknown-key", lambda w: _cfg(w, _NET + "colour=1\n"), DarknetConfigError,
        "unknown key 'colour'"),
    Bad("cfg-unknown-section", lambda w: _cfg(w, _NET + "[yolo]\n"), DarknetConfigError,
        "unsupported section"),
    Bad("cfg-not-an-integer", lambda w: _cfg(w, _NET + "[convolutional]\nfilters=ten\n"),
        DarknetConfigError, "not an integer"),
    Bad("cfg-out-of-range", lambda w: _cfg(w, _NET + "[convolutional]\nsize=0\n[softmax]\n"),
        DarknetConfigError, "out of range"),
    Bad("cfg-no-head", lambda w: _cfg(w, _NET + "[avgpool]\n"), DarknetConfigError, "no [softmax]"),
    Bad("cfg-weights-beyond-memory", lambda w: _cfg(
        w, "[net]\nheight=1024\nwidth=1024\nchannels=1048576\n[convolutional]\n"
        "filters=1048576\nsize=1024\npad=1\nactivation=linear\n[softmax]\n"),
        DarknetConfigError, "values per record, more than"),
    Bad("cfg-input-spec", lambda w: lambda: parse_input_spec("8x8"), DarknetConfigError,
        "is not HxWxC"),
    Bad("cfg-input-spec-zero", lambda w: lambda: parse_input_spec("0x8x1"), DarknetConfigError,
        "between 1 and"),
    # -- price traces (plinius crash-test --trace)
    Bad("trace-nan-time", lambda w: _trace(w, "0,1\nnan,2\n5,1\n"), ConfigError, "finite"),
    Bad("trace-inf-price", lambda w: _trace(w, "0,1\n5,inf\n"), ConfigError, "finite"),
    Bad("trace-negative-time", lambda w: _trace(w, "-5,1\n5,2\n"), ConfigError, "non-negative"),
    Bad("trace-not-increasing", lambda w: _trace(w, "0,1\n5,2\n5,1\n"), ConfigError,
        "increasing times"),
    Bad("trace-one-point", lambda w: _trace(w, "seconds,price\n0,1\n"), ConfigError,
        "at least two points"),
    Bad("trace-bad-row", lambda w: _trace(w, "0,1\n1,x\n"), ConfigError, "line 2"),
    Bad("trace-binary", lambda w: _trace(w, b"\xff\xfe\x00\x01"), ConfigError, "not a CSV text"),
    Bad("trace-directory", lambda w: lambda: PriceTrace.load(w.subdir), ConfigError,
        "not a regular file"),
    Bad("trace-fifo", lambda w: lambda: PriceTrace.load(w.fifo), ConfigError,
        "not a regular file"),
    # -- key-server policy files (plinius keyserver --policy)
    Bad("policy-5000-digit-int", lambda w: _policy(w, "allow_simulation = 1" + "0" * 5000),
        ConfigError, "not valid TOML"),
    Bad("policy-not-toml", lambda w: _policy(w, "allow_simulation = = true"), ConfigError,
        "not valid TOML"),
    Bad("policy-not-utf8", lambda w: _policy(w, b"\xff\xfe"), ConfigError, "not UTF-8"),
    Bad("policy-too-large", lambda w: _policy(w, "#" * ((1 << 20) + 1)), ConfigError,
        "larger than"),
    Bad("policy-implicit-simulation", lambda w: _policy(w, "allow_debug = false\n"), ConfigError,
        "allow_simulation is missing"),
    Bad("policy-unknown-key",
        lambda w: _policy(w, "allow_simulation = true\n[sgx]\nmrenclav = []\n"), ConfigError,
        "mrenclav is not a known key"),
    Bad("policy-fifo", _with(lambda w: w.fifo, lambda w, p: Policy.load(p)), ConfigError,
        "not a regular file"),
    Bad("identity-fifo", lambda w: lambda: load_identity(w.fifo), KeyFileError,
        "not a regular file"),
    Bad("identity-is-the-master-key", lambda w: lambda: load_identity(w.keyfile), KeyFileError,
        "not a PEM Ed25519 private key"),
    Bad("sealed-key-fifo", lambda w: lambda: unseal_master_key(_sim(w), w.fifo, job_id="j"),
        FormatError, "not a regular file"),
    Bad("sealed-key-is-the-master-key", lambda w: lambda: unseal_master_key(
        _sim(w), w.keyfile, job_id="j"), FormatError, "not a plinius sealed key"),
    # -- TPM and key-server counter arguments (train --counter tpm:TCTI / keyserver)
    Bad("tpm-empty-tcti", lambda w: lambda: TPMCounter(""), ConfigError, "TCTI"),
    Bad("tpm-index-out-of-range", lambda w: lambda: TPMCounter(index=5), ConfigError,
        "0x01000000"),
    Bad("tpm-auth-too-long", lambda w: lambda: TPMCounter(auth=b"a" * 33), ConfigError,
        "at most 32 bytes"),
    Bad("keyserver-url-unclosed-ipv6", lambda w: lambda: _ks_counter(w, url="http://[::1"),
        ConfigError, "malformed"),
    Bad("keyserver-url-bad-port", lambda w: lambda: _ks_counter(w, url="http://h:99999"),
        ConfigError, "malformed"),
    Bad("keyserver-url-scheme", lambda w: lambda: _ks_counter(w, url="ftp://h:21"), ConfigError,
        "http://HOST:PORT"),
    Bad("keyserver-pubkey", lambda w: lambda: _ks_counter(w, pubkey="00" * 31), ConfigError,
        "64 hex digits"),
    Bad("keyserver-job-id", lambda w: lambda: _ks_counter(w, job="../etc"), ConfigError,
        "a job id is"),
]  # fmt: skip


def _sim(w: W) -> Any:
    from plinius.tee import detect_platform

    return detect_platform(w.dir / "no-attestation", w.dir / "no-tsm")


def _ks_counter(w: W, url: str = "http://127.0.0.1:9", pubkey: str = "00" * 32,
                job: str = "job") -> object:  # fmt: skip
    from plinius.counters import KeyServerCounter

    return KeyServerCounter(url, pubkey, job_id=job, key=w.key)


@pytest.mark.parametrize("row", API_ROWS, ids=[r.id for r in API_ROWS])
def test_bad_input_is_refused_and_loses_nothing(w: W, row: Bad) -> None:
    act = row.make(w)
    before = snapshot(w.dir)
    with pytest.raises(row.error) as info:
        act()
    msg = str(info.value)
    assert row.phrase in msg, msg
    assert "\n" not in msg.strip(), msg
    assert_nothing_lost(before, snapshot(w.dir))
    # And the job's own files still work.
    assert MasterKey.load(w.keyfile) == w.key


def test_the_mirror_still_opens_after_the_table(w: W) -> None:
    for row in API_ROWS:
        if row.id.startswith("mirror-") and row.id != "mirror-locked":
            with contextlib.suppress(PliniusError):
                row.make(w)()
    state = {"w": torch.zeros(6)}
    with Mirror(w.mirror, w.key) as m:
        assert m.restore(state) == 1
    assert state["w"].tolist() == [0, 1, 2, 3, 4, 5]
    with SealedDataset(w.data, w.key) as ds:
        ds.verify()


def test_a_csv_with_a_byte_order_mark_is_read(w: W) -> None:
    p = w.file("bom.csv", "\ufefflabel,a\n1,2.5\n".encode())
    fields = load_csv(p, "label")
    assert fields["label"].tolist() == [1] and fields["features"].tolist() == [[2.5]]


# ---------------------------------------------------------------- the command line


@dataclass(frozen=True)
class BadCli:
    """One bad command line: ``args`` builds it; the exit code and a phrase of the output."""

    id: str
    args: Callable[[W], list[str]]
    code: int
    phrase: str
    env: dict[str, str] = field(default_factory=dict)


def _train(w: W, *extra: str, key: bool = True) -> list[str]:
    base = ["train", "--data", str(w.data), "--mirror", str(w.mirror), "--model", "mlp",
            "--steps", "2", "--no-progress"]  # fmt: skip
    return base + (["--key", str(w.keyfile)] if key else []) + list(extra)


def _set(args: list[str], flag: str, value: str | Path) -> list[str]:
    """``args`` with the value after ``flag`` replaced."""
    i = args.index(flag) + 1
    return [*args[:i], str(value), *args[i + 1 :]]


def _crash(w: W, *extra: str) -> list[str]:
    return ["crash-test", "--key", str(w.keyfile), "--data", str(w.data),
            "--mirror", str(w.dir / "campaign.plm"), "--steps", "1", *extra]  # fmt: skip


def _seal(w: W, *extra: str) -> list[str]:
    return ["seal", "--key", str(w.keyfile), *extra]


CLI_ROWS = [
    # -- usage: unknown, missing and contradictory options (exit 2)
    BadCli("unknown-command", lambda w: ["trian"], 2, "No such command"),
    BadCli("unknown-option", lambda w: _train(w, "--stpes", "3"), 2, "No such option"),
    BadCli("train-steps-zero", lambda w: _train(w, "--steps", "0"), 2, "--steps"),
    BadCli("train-shuffle-choice", lambda w: _train(w, "--shuffle", "random"), 2, "--shuffle"),
    BadCli("train-counter-every-without-counter", lambda w: _train(w, "--counter-every", "5"),
           2, "--counter-every needs --counter"),
    BadCli("train-counter-interval-without-counter",
           lambda w: _train(w, "--counter-interval", "60"), 2, "--counter-interval needs"),
    BadCli("train-sealed-key-with-key", lambda w: _train(w, "--sealed-key", str(w.dir / "s")), 2,
           "--sealed-key only applies to key release"),
    BadCli("train-job-id-with-key", lambda w: _train(w, "--job-id", "j1"), 2, "--job-id"),
    BadCli("train-pubkey-with-key", lambda w: _train(w, "--key-server-pubkey", "00" * 32), 2,
           "--key-server-pubkey"),
    BadCli("train-events-on-the-key", lambda w: _train(w, "--events", str(w.keyfile)), 2,
           "--key and --events name the same file"),
    BadCli("train-events-on-the-mirror", lambda w: _train(w, "--events", str(w.mirror)), 2,
           "--mirror and --events name the same file"),
    BadCli("train-data-is-the-mirror", lambda w: _set(_train(w), "--data", w.mirror),
           2, "--data and --mirror name the same file"),
    BadCli("evaluate-sealed-key-with-key", lambda w: [
        "evaluate", "--key", str(w.keyfile), "--data", str(w.data), "--mirror", str(w.mirror),
        "--model", "mlp", "--sealed-key", str(w.dir / "s")], 2, "--sealed-key"),
    BadCli("seal-out-is-the-key", lambda w: _seal(
        w, "--out", str(w.keyfile), "--builtin", "digits", "--overwrite"), 2,
        "--key and --out name the same file"),
    BadCli("seal-out-is-the-source", lambda w: _seal(
        w, "--out", str(_npz(w, a=np.zeros((2, 2)))), "--npz", str(w.dir / "in.npz"),
        "--overwrite"), 2, "--out and --npz name the same file"),
    BadCli("seal-two-sources", lambda w: _seal(
        w, "--out", str(w.dir / "o.pld"), "--builtin", "digits", "--npz", str(w.text)), 2,
        "exactly one source"),
    BadCli("seal-no-source", lambda w: _seal(w, "--out", str(w.dir / "o.pld")), 2,
           "exactly one source"),
    BadCli("seal-label-column-without-csv", lambda w: _seal(
        w, "--out", str(w.dir / "o.pld"), "--builtin", "digits", "--label-column", "y"), 2,
        "go together"),
    BadCli("seal-idx-images-alone", lambda w: _seal(
        w, "--out", str(w.dir / "o.pld"), "--idx-images", str(w.text)), 2, "go together"),
    BadCli("crash-test-trace-without-schedule", lambda w: _crash(w, "--trace", str(w.text)), 2,
           "--trace needs --schedule trace"),
    BadCli("crash-test-bid-without-schedule", lambda w: _crash(w, "--bid", "2"), 2,
           "--bid needs --schedule trace"),
    BadCli("crash-test-bid-nan", lambda w: _crash(w, "--schedule", "trace", "--bid", "nan"), 2,
           "not a finite price"),
    BadCli("bench-sizes-without-latency", lambda w: [
        "bench", "--out", str(w.dir / "b"), "--only", "overhead", "--sizes", "10"], 2,
        "--sizes applies to the latency section"),
    BadCli("keyserver-pccs-without-dcap", lambda w: [
        "keyserver", "--key", str(w.keyfile), "--identity", str(w.dir / "id.pem"),
        "--policy", str(w.text), "--pccs-url", "https://pccs.example"], 2,
        "--pccs-url applies to --verifier dcap-qvl"),
    BadCli("keygen-into-a-directory", lambda w: ["keygen", str(w.subdir)], 2, "is a directory"),
    BadCli("inspect-a-directory", lambda w: ["inspect", str(w.subdir)], 1, "not a mirror set"),
    # -- errors (exit 1, one line)
    BadCli("train-key-and-key-server", lambda w: _train(
        w, "--key-server", "http://127.0.0.1:9"), 1, "not both"),
    BadCli("train-missing-key", lambda w: _set(_train(w), "--key", w.dir / "none.key"), 1,
           "plinius keygen"),
    BadCli("train-no-key-at-all", lambda w: _train(w, key=False), 1, "a key is needed"),
    BadCli("train-mirror-directory", lambda w: _set(_train(w), "--mirror", w.subdir),
           1, "not a regular file"),
    BadCli("train-mirror-is-the-dataset", lambda w: _set(
        _train(w), "--mirror", w.dir / "copy.pld"), 1, "sealed dataset, not a mirror"),
    BadCli("train-data-fifo", lambda w: _set(_train(w), "--data", w.fifo), 1,
           "not a regular file"),
    BadCli("train-model-unknown", lambda w: _set(_train(w), "--model", "resnet"), 1,
           "unknown model"),
    BadCli("train-counter-spec", lambda w: _train(w, "--counter", "sometimes"), 1, "file:PATH"),
    BadCli("train-counter-file-garbage", lambda w: _train(
        w, "--counter", f"file:{w.text}"), 1, "does not hold a counter value"),
    BadCli("train-dataset-id", lambda w: _train(w, "--dataset-id", "zz"), 1, "32 hex digits"),
    BadCli("train-events-directory", lambda w: _train(w, "--events", str(w.subdir)), 1,
           "events file"),
    BadCli("evaluate-mirror-missing", lambda w: [
        "evaluate", "--key", str(w.keyfile), "--data", str(w.data), "--mirror",
        str(w.dir / "none.plm"), "--model", "mlp"], 1, "train first"),
    BadCli("evaluate-mirror-fifo", lambda w: [
        "evaluate", "--key", str(w.keyfile), "--data", str(w.data), "--mirror", str(w.fifo),
        "--model", "mlp"], 1, "not a regular file"),
    BadCli("inspect-fifo", lambda w: ["inspect", str(w.fifo)], 1, "not a regular file"),
    BadCli("inspect-text", lambda w: ["inspect", str(w.text)], 1, "neither a plinius mirror"),
    BadCli("inspect-wrong-key", lambda w: [
        "inspect", str(w.mirror), "--key", str(w.file("x.key", b"x" * 32))], 1,
        "another master key"),
    BadCli("export-over-existing", lambda w: [
        "export", str(w.mirror), "--key", str(w.keyfile), "--out", str(w.data)], 1,
        "refusing to overwrite"),
    BadCli("export-missing-dir", lambda w: [
        "export", str(w.mirror), "--key", str(w.keyfile), "--out", str(w.dir / "no" / "m.st")],
        1, "cannot create a file"),
    BadCli("export-a-dataset", lambda w: [
        "export", str(w.data), "--key", str(w.keyfile), "--out", str(w.dir / "m.st")], 1,
        "sealed dataset, not a mirror"),
    BadCli("keygen-over-existing", lambda w: ["keygen", str(w.keyfile)], 1, "already exists"),
    BadCli("seal-over-existing", lambda w: _seal(
        w, "--out", str(w.data), "--builtin", "digits"), 1, "already exists"),
    BadCli("seal-key-too-open", lambda w: [
        "seal", "--key", str(w.file("open.key", b"k" * 32, 0o644)), "--out",
        str(w.dir / "o.pld"), "--builtin", "digits"], 1, "chmod 600"),
    BadCli("seal-csv-bad-row", lambda w: _seal(
        w, "--out", str(w.dir / "o.pld"), "--csv", str(w.file("c.csv", "a,y\n1,2\nz,1\n")),
        "--label-column", "y"), 1, "line 3"),
    BadCli("models-cfg-fifo", lambda w: ["models", "--cfg", str(w.fifo)], 1,
           "not a regular file"),
    BadCli("models-input-without-cfg", lambda w: ["models", "--input", "8x8x1"], 1,
           "--input applies to --cfg"),
    BadCli("crash-test-mirror-exists", lambda w: _set(_crash(w), "--mirror", w.mirror),
           1, "starts from a new mirror file"),
    BadCli("crash-test-reference-exists", lambda w: (
        w.file("campaign.plm.reference", b"keep me"), _crash(w))[1], 1,
        "campaign.plm.reference exists"),
    BadCli("crash-test-trace-bad", lambda w: _crash(
        w, "--schedule", "trace", "--trace", str(w.file("t.csv", "0,1\nnan,2\n"))), 1, "finite"),
    BadCli("keyserver-policy-huge-int", lambda w: [
        "keyserver", "--key", str(w.keyfile), "--identity", str(w.dir / "id.pem"),
        "--policy", str(w.file("p.toml", "allow_simulation = 1" + "0" * 5000))], 1,
        "not valid TOML"),
    # -- the environment (PLINIUS_*)
    BadCli("env-key-server-with-key", lambda w: _train(w), 1, "PLINIUS_KEY_SERVER is set",
           env={"PLINIUS_KEY_SERVER": "http://127.0.0.1:9"}),
    BadCli("env-key-server-malformed", lambda w: _train(w, key=False), 1, "malformed",
           env={"PLINIUS_KEY_SERVER": "http://[::1", "PLINIUS_KEY_SERVER_PUBKEY": "00" * 32}),
    BadCli("env-key-server-scheme", lambda w: _train(w, key=False), 1, "http://HOST:PORT",
           env={"PLINIUS_KEY_SERVER": "file:///etc/passwd",
                "PLINIUS_KEY_SERVER_PUBKEY": "00" * 32}),
    BadCli("env-key-server-pubkey", lambda w: _train(w, key=False), 1, "64 hex digits",
           env={"PLINIUS_KEY_SERVER": "http://127.0.0.1:9", "PLINIUS_KEY_SERVER_PUBKEY": "xyz"}),
    BadCli("env-key-server-without-pubkey", lambda w: _train(w, key=False), 1,
           "--key-server needs --key-server-pubkey", env={"PLINIUS_KEY_SERVER": "http://h:1"}),
    BadCli("env-debug-not-1", lambda w: ["keygen", str(w.keyfile)], 1, "already exists",
           env={"PLINIUS_DEBUG": "yes"}),
]  # fmt: skip


def _invoke(args: list[str], env: dict[str, str]) -> Result:
    return run_cli(*args, env=env)


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r.id for r in CLI_ROWS])
def test_bad_command_lines_fail_clearly_and_lose_nothing(w: W, row: BadCli) -> None:
    w.copy(w.data, "copy.pld")
    args = row.args(w)
    before = snapshot(w.dir)
    r = _invoke(args, row.env)
    assert r.exit_code == row.code, r.output
    assert "Traceback" not in r.output
    if row.code == 1:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert row.phrase in lines[0], r.stderr
    else:
        assert "Usage:" in r.stderr and row.phrase in r.stderr, r.stderr
    assert_nothing_lost(before, snapshot(w.dir))


# ---------------------------------------------------------------- key-server requests


def _keyserver(tmp_path: Path, key: MasterKey) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from plinius.tee.audit import AuditLog
    from plinius.tee.counter_service import CounterStore
    from plinius.tee.keyserver import KeyServer
    from plinius.tee.policy import Policy

    store = CounterStore(tmp_path / "counters")
    server = KeyServer(
        key,
        Policy.parse("allow_simulation = true\n"),
        Ed25519PrivateKey.generate(),
        audit_log=AuditLog(tmp_path / "audit.jsonl"),
        counters=store,
    )
    return server, store


HUGE = "1" + "0" * 5000  # more digits than Python converts: a ValueError, not a JSONDecodeError

# name -> (body, status, error code)
RELEASE_BODIES = {
    "huge-version": (b'{"version": ' + HUGE.encode() + b"}", 400, "bad_request"),
    "huge-in-evidence": (json.dumps({
        "version": 1, "job_id": "j", "nonce": "00" * 32, "client_public_key": "00" * 32,
        "evidence": {"kind": "x"}}).replace('"x"', HUGE).encode(), 400, "bad_request"),
    "not-json": (b"{version: 1}", 400, "bad_request"),
    "not-an-object": (b"[1, 2]", 400, "bad_request"),
    "nan-version": (b'{"version": NaN}', 400, "bad_request"),
    "deep": (b"[" * 60_000, 400, "bad_request"),
    "not-utf8": (b'{"version": "\xff"}', 400, "bad_request"),
    "too-large": (b" " * (64 * 1024 + 1), 413, "too_large"),
}  # fmt: skip

COUNTER_BODIES = {
    # Counter requests are capped at 1 KiB: a 5000-digit integer never reaches the parser.
    "huge-target": (json.dumps({
        "version": 1, "job_id": "j", "op": "advance", "nonce": "00" * 32, "target": 7,
        "mac": "00" * 32}).replace(": 7", ": " + HUGE).encode(), 413, "too_large"),
    "not-json": (b"op=read", 400, "bad_request"),
    "wrong-op": (b'{"op": "reset"}', 400, "bad_request"),
    "deep": (b"[" * 1000, 400, "bad_request"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(RELEASE_BODIES))
def test_bad_release_requests_are_refused_and_spend_nothing(tmp_path: Path, name: str) -> None:
    server, _ = _keyserver(tmp_path, MasterKey(b"s" * 32))
    _, issued = server.issue_nonce()
    body, status, code = RELEASE_BODIES[name]
    assert server.release(body, "127.0.0.1") == (status, {"error": code, "reason": ANY})
    # The outstanding nonce was not spent by the malformed request.
    assert bytes.fromhex(issued["nonce"]) in server.nonces._live  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(COUNTER_BODIES))
def test_bad_counter_requests_are_refused_and_change_nothing(tmp_path: Path, name: str) -> None:
    server, store = _keyserver(tmp_path, MasterKey(b"s" * 32))
    before = snapshot(tmp_path / "counters")
    body, status, code = COUNTER_BODIES[name]
    assert server.counter(body, "127.0.0.1") == (status, {"error": code, "reason": ANY})
    assert snapshot(tmp_path / "counters") == before
    store.close()


def test_a_damaged_counter_state_file_is_refused(tmp_path: Path) -> None:
    from plinius.tee.counter_service import CounterStore

    store = CounterStore(tmp_path / "counters")
    try:
        p = store.path_for("job")
        # Under the state file's 4 KiB cap, but more digits than Python converts.
        p.write_text('{"format": "plinius-counter", "version": 1, "job_id": "job", "value": '
                     + "9" * 4000 + "}")  # fmt: skip
        p.chmod(0o600)
        with pytest.raises(FormatError, match="is damaged"):
            store.read("job")
        assert p.read_text().endswith("9" * 4000 + "}")  # kept for the operator to look at
    finally:
        store.close()


def test_a_key_server_answer_with_a_huge_integer_is_a_key_release_error() -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from plinius.errors import KeyReleaseError
    from plinius.tee.protocol import RELEASE_DOMAIN, open_release_response

    ident = Ed25519PrivateKey.generate()
    data = b'{"n": ' + HUGE.encode() + b"}"  # genuinely signed, yet unparseable
    signed = {
        "payload": base64.b64encode(data).decode(),
        "signature": ident.sign(RELEASE_DOMAIN + data).hex(),
    }
    with pytest.raises(KeyReleaseError, match="not JSON"):
        open_release_response(ident.public_key(), signed)


# ---------------------------------------------------------------- a full file system


@pytest.fixture
def full_fs() -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards whatever happens (root only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("simulating a full file system needs root to mount a small tmpfs")
    d = Path(tempfile.mkdtemp(prefix="plinius-full-"))
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(d)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)
        d.rmdir()


def _fill(d: Path) -> None:
    """Write until the file system refuses."""
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def _full_rows(d: Path, key: MasterKey) -> list[tuple[str, Callable[[], object], Path]]:
    """(what, action, the final name that must not appear)."""
    return [
        ("seal", lambda: seal_dataset(d / "new.pld", key, {"x": np.zeros((64, 64))}),
         d / "new.pld"),
        ("mirror-create", lambda: Mirror(d / "new.plm", key), d / "new.plm"),
        ("key-save", lambda: MasterKey.generate().save(d / "new.key"), d / "new.key"),
        ("counter", lambda: FileCounter(d / "ctr").increment(), d / "ctr"),
    ]  # fmt: skip


def test_a_full_file_system_raises_storage_error_and_leaves_no_partial_file(
    full_fs: Path, key: MasterKey
) -> None:
    d = full_fs
    key.save(d / "owner.key")
    seal_dataset(d / "old.pld", key, {"x": np.arange(64.0).reshape(8, 8)})
    _fill(d)
    before = snapshot(d)
    for what, act, final in _full_rows(d, key):
        with pytest.raises(StorageError, match="free some space") as info:
            act()
        assert "\n" not in str(info.value), what
        assert not final.exists(), what
        assert_nothing_lost(before, snapshot(d))  # no temporary file left either
    # Replacing an existing dataset on a full disk keeps the old one whole.
    with pytest.raises(StorageError, match="free some space"):
        seal_dataset(d / "old.pld", key, {"x": np.zeros((64, 64))}, overwrite=True)
    assert_nothing_lost(before, snapshot(d))
    with SealedDataset(d / "old.pld", key) as ds:
        assert ds.get_batch([7])[0].tolist() == [list(range(56, 64))]


def test_a_mirror_that_cannot_grow_keeps_its_last_generation(full_fs: Path, key: MasterKey) -> None:
    path = full_fs / "job.plm"
    with Mirror(path, key) as m:
        m.save({"w": torch.full((100,), 1.0)}, step=1)
        _fill(full_fs)
        image = path.read_bytes()
        with pytest.raises(StorageError, match="cannot grow"):
            m.save({"w": torch.full((100,), 2.0), "big": torch.ones(200_000)}, step=2)
        assert path.read_bytes() == image  # nothing was written before the growth failed
        # The mirror is still usable: a state that fits its slots commits.
        m.save({"w": torch.full((100,), 3.0)}, step=3)
    state = {"w": torch.zeros(100)}
    with Mirror(path, key, readonly=True) as m:
        assert m.restore(state) == 3 and bool((state["w"] == 3.0).all())
    assert sorted(p.name for p in full_fs.iterdir()) == ["filler", "job.plm"]


@pytest.mark.parametrize("command", ["keygen", "seal", "export"])
def test_commands_on_a_full_file_system(
    full_fs: Path, shm_dir: Path, key: MasterKey, command: str
) -> None:
    keyfile = shm_dir / "owner.key"
    key.save(keyfile)
    mirror = shm_dir / "job.plm"
    with Mirror(mirror, key) as m:
        m.save({"model": torch.nn.Linear(300, 300)}, step=1)
    _fill(full_fs)
    before = snapshot(full_fs)
    out = full_fs / "out"
    args = {
        "keygen": ["keygen", str(out)],
        "seal": ["seal", "--key", str(keyfile), "--out", str(out), "--builtin", "digits"],
        "export": ["export", str(mirror), "--key", str(keyfile), "--out", str(out)],
    }[command]
    r = _invoke(args, {})
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "No space left on device" in lines[0] and "free some space" in lines[0], r.stderr
    assert_nothing_lost(before, snapshot(full_fs))
