"""Readers for `plinius seal` inputs (digits, NPZ, IDX plain and gzipped, CSV) and bad forms."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from plinius.data.sources import load_builtin, load_csv, load_idx, load_npz
from plinius.errors import ConfigError


def test_digits_are_uint8_scaled_to_the_full_range() -> None:
    f = load_builtin("digits")
    assert list(f) == ["image", "label"]
    assert f["image"].dtype == np.uint8 and f["image"].shape == (1797, 8, 8)
    assert f["image"].max() == 255 and f["image"].min() == 0
    assert f["label"].dtype == np.int64 and set(f["label"].tolist()) == set(range(10))
    with pytest.raises(ConfigError, match="unknown built-in"):
        load_builtin("mnist")


# -- NPZ -------------------------------------------------------------------------


def test_npz_keeps_every_array_in_order(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    x, y, w = np.ones((5, 2), np.float32), np.arange(5), np.zeros(5, np.float16)
    np.savez(p, x=x, y=y, w=w)
    f = load_npz(p)
    assert list(f) == ["x", "y", "w"]
    assert np.array_equal(f["x"], x) and f["w"].dtype == np.float16
    np.savez_compressed(p, a=x)
    assert np.array_equal(load_npz(p)["a"], x)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: np.savez(p, x=np.ones(3), y=np.ones(4)), "same first dimension"),
        (lambda p: np.savez(p, x=np.ones(3), s=np.float32(2)), "same first dimension"),
        (lambda p: np.savez(p, o=np.array([{}, []], dtype=object)), "cannot read an array"),
        (lambda p: np.savez(p), "no arrays"),
        (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "not a readable .npz"),
        (lambda p: p.write_bytes(b"hello"), "not a readable .npz"),
        (lambda p: np.save(p.with_suffix(".npy"), np.ones(3)) or p.with_suffix(".npy").rename(p),
         "single .npy"),
    ],
)  # fmt: skip
def test_bad_npz(tmp_path: Path, make: object, match: str) -> None:
    p = tmp_path / "d.npz"
    make(p)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=match):
        load_npz(p)


def test_corrupt_npz_member(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez_compressed(p, x=np.arange(10000))
    raw = bytearray(p.read_bytes())
    raw[200] ^= 0xFF  # inside the deflated data
    p.write_bytes(bytes(raw))
    with pytest.raises(ConfigError):
        load_npz(p)


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    with pytest.raises(ConfigError, match="directory"):
        load_csv(tmp_path, "label")
    with pytest.raises(ConfigError, match="does not exist"):
        load_idx(tmp_path / "a", tmp_path / "b")


# -- IDX -------------------------------------------------------------------------


def _idx(arr: np.ndarray, code: int) -> bytes:
    be = arr.astype(arr.dtype.newbyteorder(">"))
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + be.tobytes()


@pytest.fixture
def mnist_like(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 7, 5), dtype=np.uint8)
    y = rng.integers(0, 10, size=30, dtype=np.uint8)
    (tmp_path / "img.idx").write_bytes(_idx(x, 0x08))
    (tmp_path / "lab.idx").write_bytes(_idx(y, 0x08))
    return tmp_path / "img.idx", tmp_path / "lab.idx", x, y


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(mnist_like: tuple[Path, Path, np.ndarray, np.ndarray], gz: bool) -> None:
    img, lab, x, y = mnist_like
    if gz:
        for p in (img, lab):
            p.write_bytes(gzip.compress(p.read_bytes()))
    f = load_idx(img, lab)
    assert list(f) == ["image", "label"]
    assert f["image"].dtype == np.uint8 and np.array_equal(f["image"], x)
    assert f["label"].dtype == np.int64 and np.array_equal(f["label"], y)


@pytest.mark.parametrize(
    ("dtype", "code"),
    [(np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)],
)
def test_idx_big_endian_types(tmp_path: Path, dtype: type, code: int) -> None:
    x = (np.arange(24).reshape(4, 6) - 10).astype(dtype)
    (tmp_path / "x").write_bytes(_idx(x, code))
    (tmp_path / "y").write_bytes(_idx(np.arange(4, dtype=np.int32), 0x0C))
    f = load_idx(tmp_path / "x", tmp_path / "y")
    assert f["image"].dtype == np.dtype(dtype) and np.array_equal(f["image"], x)


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (b"\x00\x00\x08", None, "truncated IDX file"),
        (b"\x01\x00\x08\x03" + bytes(12), None, "not an IDX file"),
        (b"\x00\x00\x07\x03" + bytes(12), None, "not an IDX file"),
        (b"\x00\x00\x08\x00", None, "0 dimensions"),
        (b"\x00\x00\x08\x09" + bytes(36), None, "9 dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">III", 30, 7, 5) + bytes(1049), None, "truncated"),
        (b"\x00\x00\x08\x03" + struct.pack(">III", 30, 7, 5) + bytes(1051), None, "bytes after"),
        # a forged size: fails at the end of the real data, allocates nothing big
        (b"\x00\x00\x08\x03" + struct.pack(">III", 2**32 - 1, 2**32 - 1, 255), None, "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 30) + bytes(30), None, "at least 2 dimensions"),
        (None, b"\x00\x00\x08\x02" + struct.pack(">II", 30, 1) + bytes(30), "1 dimension"),
        (None, b"\x00\x00\x08\x01" + struct.pack(">I", 29) + bytes(29), "30 images but"),
        (None, b"\x00\x00\x0d\x01" + struct.pack(">I", 30) + bytes(120), "must be integers"),
        (b"\x1f\x8b\x08\x00garbage-garbage", None, "corrupt gzip"),
        (gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 30) + bytes(30))[:-12], None,
         "corrupt gzip|truncated"),
    ],
)  # fmt: skip
def test_bad_idx(
    mnist_like: tuple[Path, Path, np.ndarray, np.ndarray],
    images: bytes | None,
    labels: bytes | None,
    match: str,
) -> None:
    img, lab, _, _ = mnist_like
    if images is not None:
        img.write_bytes(images)
    if labels is not None:
        lab.write_bytes(labels)
    with pytest.raises(ConfigError, match=match):
        load_idx(img, lab)


# -- CSV -------------------------------------------------------------------------


def test_csv_happy_path(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("a, label ,b\n1.5,3,2\n-1e3,0,7\n\n4,2.0,5\n", encoding="utf-8")
    f = load_csv(p, "label")
    assert list(f) == ["features", "label"]
    assert f["features"].dtype == np.float32
    assert f["features"].tolist() == [[1.5, 2.0], [-1000.0, 7.0], [4.0, 5.0]]
    assert f["label"].dtype == np.int64 and f["label"].tolist() == [3, 0, 2]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("a,label\n", "no data rows"),
        ("a,b\n1,2\n", "no column 'label'; its columns are a, b"),
        ("label\n1\n", "no feature columns"),
        ("a,a,label\n1,2,3\n", "line 1: column 'a' appears twice"),
        ("a,label\n1,2\n3\n", "line 3: 1 values, but the header has 2 columns"),
        ("a,label\n1,2\n3,4,5\n", "line 3: 3 values"),
        ("a,label\n1,2\nx,4\n", "line 3: column 'a': 'x' is not a number"),
        ("a,label\n1,2\nnan,4\n", "line 3: column 'a': 'nan' is not a finite number"),
        ("a,label\n1,cat\n", "line 2: label column 'label': 'cat' is not an integer"),
        ("a,label\n1,2.5\n", "line 2: label column 'label': '2.5'"),
        ("a,label\n1,99999999999999999999\n", "line 2: label column"),
        ('a,label\n"1,2\n', "malformed CSV"),
    ],
)
def test_bad_csv_names_the_line(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "d.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_csv(p, "label")


def test_csv_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_bytes(b"a,label\n\xff\xfe,1\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_csv(p, "label")


@pytest.mark.parametrize("value", ["1e39", "-1e39", "3.5e38"])
def test_csv_value_beyond_float32_is_refused_naming_line_and_column(
    tmp_path: Path, value: str
) -> None:
    # Issue 17, item 11: such a value used to be sealed as +-inf (with a
    # RuntimeWarning), while the text "inf" itself was refused.
    p = tmp_path / "d.csv"
    p.write_text(f"a,b,label\n1,2,0\n3,{value},1\n")
    with pytest.raises(ConfigError, match=r"line 3: column 'b': .* outside the float32 range"):
        load_csv(p, "label")


def test_csv_largest_float32_is_kept_exactly(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("a,label\n3.4028234663852886e38,0\n-1.5,1\n")
    f = load_csv(p, "label")
    assert f["features"][0, 0] == np.finfo(np.float32).max
