"""Readers for the inputs of ``plinius seal``: built-in digits, NPZ, IDX (MNIST) and CSV.

Each returns the fields to seal, in order (the first is the model input, the
last the label). Malformed input raises :class:`ConfigError` naming the file
and, for CSV, the line; a missing or unreadable file raises
:class:`StorageError`. Nothing here trusts a length it has read: IDX
dimensions are checked against the bytes actually present before anything
is allocated for them.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import numpy as np

from ..errors import ConfigError, storage_error

__all__ = ["BUILTIN", "load_builtin", "load_csv", "load_idx", "load_npz"]

Fields = dict[str, np.ndarray[Any, Any]]

BUILTIN = ("digits",)
MAX_IDX_DIMS = 8
# IDX data type codes (the third magic byte) -> big-endian numpy dtype.
_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_builtin(name: str) -> Fields:
    """A dataset bundled with a dependency; ``"digits"`` is scikit-learn's 8x8 digits.

    Images are uint8 of shape (8, 8), their 0..16 intensities rescaled to 0..255
    (rounded) so that, like MNIST, the trainer's scaling by the dtype's maximum
    maps them to [0, 1]; labels are int64.
    """
    if name != "digits":
        raise ConfigError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN)}")
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images)
    # The bundled values are small integers stored as floats: keep them exact.
    if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 255:
        raise ConfigError("scikit-learn's digits are not 8-bit integers; cannot seal them as uint8")
    return {
        "image": np.rint(images * (255.0 / 16.0)).astype(np.uint8),
        "label": np.asarray(d.target, dtype=np.int64),
    }


def load_npz(path: str | os.PathLike[str]) -> Fields:
    """Every array in an ``.npz`` archive, in archive order (no pickled objects)."""
    p = Path(path)
    _check_file(p)
    out: Fields = {}
    try:
        npz = np.load(p, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise storage_error(exc, f"cannot read {p}") from exc
        raise ConfigError(f"{p} is not a readable .npz archive: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ConfigError(f"{p} is a single .npy array, not an .npz archive")
    try:
        for name in npz.files:
            out[name] = npz[name]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise ConfigError(f"{p}: cannot read an array from the archive: {exc}") from exc
    except MemoryError as exc:  # numpy allocates the declared shape before reading the data
        raise ConfigError(
            f"{p}: an array declares more data than fits in memory ({exc}); "
            "the archive is damaged or too large for this machine"
        ) from exc
    finally:
        npz.close()
    if not out:
        raise ConfigError(f"{p} holds no arrays; nothing to seal")
    counts = {n: (a.shape[0] if a.ndim else None) for n, a in out.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        listing = ", ".join(f"{n}: {a.shape}" for n, a in out.items())
        raise ConfigError(
            f"{p}: every array needs the same first dimension (the records); got {listing}"
        )
    return out


@contextmanager
def _open_maybe_gz(p: Path) -> Iterator[BinaryIO]:
    _check_file(p)
    try:
        f = open(p, "rb")  # noqa: SIM115 - wrapped below, closed in finally
    except OSError as exc:
        raise storage_error(exc, f"cannot open {p}") from exc
    try:
        if f.read(2) == b"\x1f\x8b":
            f.seek(0)
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield cast(BinaryIO, g)
        else:
            f.seek(0)
            yield f
    finally:
        f.close()


def _read_upto(f: IO[bytes], n: int, p: Path) -> bytes:
    try:
        return f.read(n)
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError without errno: the data, not the disk.
        if isinstance(exc, OSError) and exc.errno:
            raise storage_error(exc, f"cannot read {p}") from exc
        raise ConfigError(f"{p}: corrupt gzip data ({exc})") from exc


def _read_exact(f: IO[bytes], n: int, p: Path, what: str) -> bytes:
    data = _read_upto(f, n, p)
    if len(data) != n:
        raise ConfigError(f"{p}: truncated IDX file: {what} needs {n} bytes, found {len(data)}")
    return data


def _read_idx(p: Path) -> np.ndarray[Any, Any]:
    with _open_maybe_gz(p) as f:
        magic = _read_exact(f, 4, p, "the magic number")
        if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_TYPES:
            raise ConfigError(f"{p} is not an IDX file (magic {magic.hex()})")
        ndim = magic[3]
        if not 1 <= ndim <= MAX_IDX_DIMS:
            raise ConfigError(f"{p}: an IDX file with {ndim} dimensions is not supported")
        dims = tuple(
            int.from_bytes(_read_exact(f, 4, p, "the dimensions"), "big") for _ in range(ndim)
        )
        dtype = _IDX_TYPES[magic[2]]
        nbytes = math.prod(dims) * dtype.itemsize
        # Read in pieces so a forged size fails at the end of the real data,
        # not with a giant allocation up front.
        parts: list[bytes] = []
        got = 0
        while got < nbytes:
            piece = _read_upto(f, min(nbytes - got, 1 << 24), p)
            if not piece:
                raise ConfigError(
                    f"{p}: truncated IDX file: dimensions {dims} need {nbytes} data bytes, "
                    f"found {got}"
                )
            parts.append(piece)
            got += len(piece)
        if _read_upto(f, 1, p):
            raise ConfigError(f"{p}: the IDX file has bytes after the {dims} array it declares")
    arr = np.frombuffer(b"".join(parts), dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def load_idx(images: str | os.PathLike[str], labels: str | os.PathLike[str]) -> Fields:
    """An IDX image file and an IDX label file (MNIST, Fashion-MNIST), plain or gzipped."""
    pi, pl = Path(images), Path(labels)
    x = _read_idx(pi)
    y = _read_idx(pl)
    if x.ndim < 2:
        raise ConfigError(f"{pi}: an IDX image file has at least 2 dimensions, this one {x.ndim}")
    if y.ndim != 1:
        raise ConfigError(f"{pl}: an IDX label file has 1 dimension, this one {y.ndim}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{pl}: labels must be integers, not {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"{pi} holds {x.shape[0]} images but {pl} holds {y.shape[0]} labels")
    return {"image": x, "label": y.astype(np.int64)}


def load_csv(path: str | os.PathLike[str], label_column: str) -> Fields:
    """A CSV file with a header row: numeric columns become the float32 ``features``
    field, ``label_column`` (integers) the int64 ``label`` field."""
    p = Path(path)
    _check_file(p)
    try:
        # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first name.
        f = open(p, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed in finally
    except OSError as exc:
        raise storage_error(exc, f"cannot open {p}") from exc
    try:
        return _parse_csv(f, p, label_column)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p} is not UTF-8 text ({exc.reason})") from exc
    finally:
        f.close()


def _parse_csv(f: IO[str], p: Path, label_column: str) -> Fields:
    reader = csv.reader(f, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"{p} is empty; a CSV file needs a header row")
        names = [h.strip() for h in header]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"{p}, line 1: column {dup!r} appears twice in the header")
        if label_column not in names:
            raise ConfigError(
                f"{p} has no column {label_column!r}; its columns are {', '.join(names)}"
            )
        li = names.index(label_column)
        feature_cols = [i for i in range(len(names)) if i != li]
        if not feature_cols:
            raise ConfigError(f"{p} has no feature columns besides {label_column!r}")
        feats: list[list[float]] = []
        labels: list[int] = []
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) != len(names):
                raise ConfigError(
                    f"{p}, line {line}: {len(row)} values, but the header has {len(names)} columns"
                )
            feats.append([_number(row[i], p, line, names[i]) for i in feature_cols])
            labels.append(_label(row[li], p, line, label_column))
    except csv.Error as exc:
        raise ConfigError(f"{p}, line {reader.line_num}: malformed CSV ({exc})") from exc
    if not labels:
        raise ConfigError(f"{p} has a header but no data rows; nothing to seal")
    return {
        "features": np.asarray(feats, dtype=np.float32),
        "label": np.asarray(labels, dtype=np.int64),
    }


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(text: str, p: Path, line: int, col: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{p}, line {line}: column {col!r}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{p}, line {line}: column {col!r}: {text!r} is not a finite number")
    # Features are sealed as float32: a larger magnitude would become +-inf silently.
    if abs(v) > _FLOAT32_MAX:
        raise ConfigError(
            f"{p}, line {line}: column {col!r}: {text!r} is outside the float32 range of the "
            f"features field (magnitude at most {_FLOAT32_MAX:.7g}); rescale the column"
        )
    return v


def _label(text: str, p: Path, line: int, col: str) -> int:
    t = text.strip()
    v: float | int
    try:
        v = int(t)
    except ValueError:
        try:
            v = float(t)
        except ValueError:
            v = math.nan
    if (isinstance(v, float) and not v.is_integer()) or not -(2**63) <= v < 2**63:
        raise ConfigError(
            f"{p}, line {line}: label column {col!r}: {text!r} is not an integer class label"
        )
    return int(v)


def _check_file(p: Path) -> None:
    if not p.exists():
        raise ConfigError(f"input file {p} does not exist; check the path")
    if p.is_dir():
        raise ConfigError(f"input {p} is a directory; give a file")
    if not p.is_file():  # a FIFO or device: reading it could block or never end
        raise ConfigError(f"input {p} is not a regular file; give a file")
