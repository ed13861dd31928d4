"""Sealed datasets: round trips, the reading API, bad input, crash-safe sealing, inspect."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from plinius.crypto import MasterKey
from plinius.data import (
    SUPPORTED_DTYPES,
    FieldInfo,
    SealedDataset,
    default_chunk_records,
    inspect_dataset,
    seal_dataset,
)
from plinius.errors import (
    ConfigError,
    DatasetIndexError,
    FormatError,
    PliniusError,
    StorageError,
    WrongKeyError,
)

NUMPY_DTYPES = [d for d in SUPPORTED_DTYPES if d != "bfloat16"]


def _random(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith("complex"):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _same(t: torch.Tensor, a: np.ndarray) -> bool:
    return bool(np.array_equal(t.numpy(), a, equal_nan=a.dtype.kind in "fc"))


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (3,), (2, 3, 5)])
def test_round_trip_every_dtype_and_shape(
    shm_dir: Path, key: MasterKey, dtype: str, shape: tuple[int, ...]
) -> None:
    n = 37
    x = _random(dtype, (n, *shape))
    y = np.arange(n, dtype=np.int64)
    path = shm_dir / "d.pld"
    seal_dataset(path, key, {"x": x, "y": y}, chunk_records=8)
    with SealedDataset(path, key) as ds:
        assert len(ds) == n
        assert ds.fields == [
            FieldInfo("x", getattr(torch, dtype), shape),
            FieldInfo("y", torch.int64, ()),
        ]
        bx, by = ds.get_batch(range(n))
        assert bx.dtype == getattr(torch, dtype) and tuple(bx.shape) == (n, *shape)
        assert _same(bx, x) and _same(by, y)
        for i in (0, 7, 8, n - 1):
            rx, ry = ds[i]
            assert _same(rx, x[i]) and int(ry) == i


def test_round_trip_torch_tensors_incl_bfloat16_and_views(shm_dir: Path, key: MasterKey) -> None:
    base = torch.randn(20, 6)
    fields = {
        "bf16": torch.randn(20, 4).to(torch.bfloat16),
        "transposed": base.t().contiguous().t(),  # non-contiguous view
        "sliced": torch.arange(60, dtype=torch.int32).reshape(20, 3)[:, ::2],
        "big_endian": torch.from_numpy(np.arange(20, dtype=np.int64)),
        "requires_grad": torch.randn(20, 2, requires_grad=True),
        "label": torch.arange(20),
    }
    path = shm_dir / "t.pld"
    seal_dataset(path, key, fields, chunk_records=3)
    with SealedDataset(path, key) as ds:
        out = ds.get_batch(list(range(20)))
        for (name, value), got in zip(fields.items(), out, strict=True):
            assert got.dtype == value.dtype, name
            assert torch.equal(got, value.detach()), name


def test_big_endian_and_non_contiguous_numpy(shm_dir: Path, key: MasterKey) -> None:
    a = np.arange(30, dtype=">i4").reshape(10, 3)
    b = np.asfortranarray(np.arange(40, dtype=np.float64).reshape(10, 4))
    seal_dataset(shm_dir / "e.pld", key, {"a": a, "b": b[:, ::-1]}, chunk_records=4)
    with SealedDataset(shm_dir / "e.pld", key) as ds:
        ga, gb = ds.get_batch(np.arange(10))
        assert ga.dtype == torch.int32 and np.array_equal(ga.numpy(), a)
        assert np.array_equal(gb.numpy(), b[:, ::-1])


@pytest.mark.parametrize(
    ("n", "chunk"),
    [(1, None), (1, 5), (7, 7), (8, 7), (13, 7), (14, 7), (100, 1), (100, 33)],
)
def test_tiny_and_chunk_boundary_sets(shm_dir: Path, key: MasterKey, n: int, chunk: int) -> None:
    x = np.arange(n * 4, dtype=np.uint8).reshape(n, 4)
    seal_dataset(shm_dir / "b.pld", key, {"x": x}, chunk_records=chunk)
    with SealedDataset(shm_dir / "b.pld", key) as ds:
        assert len(ds) == n
        r = chunk or n
        assert ds.chunk_records == min(r, n)
        assert ds.num_chunks == -(-n // min(r, n))
        (got,) = ds.get_batch(np.arange(n)[::-1])
        assert np.array_equal(got.numpy(), x[::-1])
        ds.verify()


def test_default_chunk_size_is_about_256_kib() -> None:
    assert default_chunk_records(792, 60000) == 262144 // 792 == 330
    assert default_chunk_records(72, 1797) == 1797  # the digits fit in one chunk
    assert default_chunk_records(1 << 20, 10) == 1  # records larger than a chunk
    assert default_chunk_records(1, 10) == 10  # never more than the records


def test_get_batch_index_forms(shm_dir: Path, key: MasterKey) -> None:
    x = np.arange(50, dtype=np.int16).reshape(25, 2)
    seal_dataset(shm_dir / "i.pld", key, {"x": x}, chunk_records=4)
    with SealedDataset(shm_dir / "i.pld", key) as ds:
        want = x[[3, 3, 24, 0]]
        for form in ([3, 3, 24, 0], np.array([3, 3, 24, 0]), torch.tensor([3, 3, 24, 0])):
            (got,) = ds.get_batch(form)
            assert np.array_equal(got.numpy(), want)
        (neg,) = ds.get_batch([-1, -25])
        assert np.array_equal(neg.numpy(), x[[24, 0]])
        (empty,) = ds.get_batch([])
        assert empty.shape == (0, 2) and empty.dtype == torch.int16
        (sl,) = ds[2:9:3]
        assert np.array_equal(sl.numpy(), x[2:9:3])
        (lst,) = ds[[5, 6]]
        assert np.array_equal(lst.numpy(), x[[5, 6]])
        (one,) = ds[np.int64(7)]
        assert np.array_equal(one.numpy(), x[7])
        (neg1,) = ds[-1]
        assert np.array_equal(neg1.numpy(), x[24])
        items = ds.__getitems__([1, 2])
        assert [tuple(t.tolist() for t in it) for it in items] == [([2, 3],), ([4, 5],)]
        # The result is the caller's: writing into it does not touch the cache.
        (mine,) = ds.get_batch([0])
        mine.fill_(99)
        assert ds[0][0].tolist() == [0, 1]


@pytest.mark.parametrize("bad", [25, -26, 10**6, [0, 25], np.array([1, 2**40])])
def test_out_of_range_is_plinius_and_index_error(
    shm_dir: Path, key: MasterKey, bad: object
) -> None:
    seal_dataset(shm_dir / "o.pld", key, {"x": np.zeros((25, 1), np.uint8)})
    with SealedDataset(shm_dir / "o.pld", key) as ds:
        with pytest.raises(DatasetIndexError) as ei:
            ds[bad]
        assert isinstance(ei.value, IndexError) and isinstance(ei.value, PliniusError)
        # The sequence protocol: iteration stops at the IndexError.
        assert sum(1 for _ in ds) == 25


def test_bad_index_types(shm_dir: Path, key: MasterKey) -> None:
    seal_dataset(shm_dir / "o.pld", key, {"x": np.zeros((5, 1), np.uint8)})
    with SealedDataset(shm_dir / "o.pld", key) as ds:
        for bad in (1.5, [1.0, 2.0], np.zeros((2, 2), np.int64), "a", [True, False]):
            with pytest.raises(ConfigError):
                ds[bad]


def test_cache_decrypts_each_chunk_once_when_reading_sequentially(
    shm_dir: Path, key: MasterKey
) -> None:
    x = np.arange(1000, dtype=np.int32)
    seal_dataset(shm_dir / "c.pld", key, {"x": x, "y": x * 2}, chunk_records=10)
    with SealedDataset(shm_dir / "c.pld", key) as ds:
        for lo in range(0, 1000, 7):  # batches that straddle chunk boundaries
            gx, gy = ds.get_batch(range(lo, min(1000, lo + 7)))
            assert np.array_equal(gy.numpy(), 2 * gx.numpy())
        assert ds.chunks_decrypted == ds.num_chunks == 100
        ds.get_batch([999, 0])  # 0 fell out of the small cache, 999 is in it
        assert ds.chunks_decrypted == 101


def test_cache_is_bounded(shm_dir: Path, key: MasterKey) -> None:
    seal_dataset(shm_dir / "c.pld", key, {"x": np.arange(100, dtype=np.int64)}, chunk_records=1)
    with SealedDataset(shm_dir / "c.pld", key, cache_chunks=3) as ds:
        ds.get_batch(range(100))
        assert ds._arena is not None and len(ds._arena.chunk_in) == 3
        assert ds.chunks_decrypted == 100
        ds.get_batch([97, 98, 99])
        assert ds.chunks_decrypted == 100


def test_metadata_and_repr(shm_dir: Path, key: MasterKey) -> None:
    dsid = seal_dataset(shm_dir / "m.pld", key, {"img": np.zeros((3, 2, 2), np.uint8)})
    with SealedDataset(shm_dir / "m.pld", key, expect_id=dsid.upper()) as ds:
        assert ds.dataset_id == dsid and len(dsid) == 32
        assert ds.key_fingerprint == key.fingerprint.hex()
        name, dtype, shape = ds.fields[0]
        assert (name, dtype, shape) == ("img", torch.uint8, (2, 2))
        assert ds.fields[0].record_bytes == 4 and ds.fields[0].dtype_name == "uint8"
        assert dsid in repr(ds) and key.raw_bytes().hex() not in repr(ds)
    with pytest.raises(StorageError, match="closed"):
        ds[0]
    ds.close()  # idempotent


def test_every_seal_gets_a_fresh_id(shm_dir: Path, key: MasterKey) -> None:
    x = {"x": np.zeros((4, 4), np.uint8)}
    a = seal_dataset(shm_dir / "a.pld", key, x)
    b = seal_dataset(shm_dir / "b.pld", key, x)
    assert a != b
    assert (shm_dir / "a.pld").read_bytes()[200:] != (shm_dir / "b.pld").read_bytes()[200:]


# -- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"x": np.zeros((3, 2)), "y": np.zeros(4)}, "same number of records"),
        ({"x": np.array([object(), object()], dtype=object)}, "unsupported dtype"),
        ({"x": np.array(["a", "b"])}, "unsupported dtype"),
        ({"x": np.zeros(2, dtype="datetime64[s]")}, "unsupported dtype"),
        ({"x": np.zeros(2, dtype=[("a", "i4"), ("b", "f4")])}, "unsupported dtype"),
        ({"x": np.zeros(2, dtype=np.float128)}, "unsupported dtype"),
        ({"x": torch.zeros(2, dtype=torch.float8_e4m3fn)}, "unsupported dtype"),
        ({"x": torch.zeros(2, 3).to_sparse()}, "dense"),
        ({"x": np.zeros((0, 3))}, "empty"),
        ({}, "at least one field"),
        ({"x": np.float32(1.0)}, "numpy array"),
        ({"x": np.array(1.0)}, "scalar"),
        ({"x": [1, 2, 3]}, "numpy array"),
        ({"x": np.zeros((3, 0))}, "zero elements"),
        ({"": np.zeros(3)}, "field names"),
        ({"a\nb": np.zeros(3)}, "control characters"),
    ],
)
def test_bad_fields_are_refused_and_nothing_written(
    shm_dir: Path, key: MasterKey, fields: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        seal_dataset(shm_dir / "bad.pld", key, fields)  # type: ignore[arg-type]
    assert list(shm_dir.iterdir()) == []


def test_bad_arguments(shm_dir: Path, key: MasterKey) -> None:
    x = {"x": np.zeros(3)}
    with pytest.raises(ConfigError, match="MasterKey"):
        seal_dataset(shm_dir / "k.pld", key.raw_bytes(), x)  # type: ignore[arg-type]
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="chunk_records"):
            seal_dataset(shm_dir / "k.pld", key, x, chunk_records=bad)  # type: ignore[arg-type]
    assert list(shm_dir.iterdir()) == []
    seal_dataset(shm_dir / "k.pld", key, x)
    with pytest.raises(ConfigError, match="MasterKey"):
        SealedDataset(shm_dir / "k.pld", key.raw_bytes())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cache_chunks"):
        SealedDataset(shm_dir / "k.pld", key, cache_chunks=0)
    with pytest.raises(ConfigError, match="32 hex digits"):
        SealedDataset(shm_dir / "k.pld", key, expect_id="abc")


def test_existing_output_is_refused_unless_overwrite(shm_dir: Path, key: MasterKey) -> None:
    path = shm_dir / "x.pld"
    first = seal_dataset(path, key, {"x": np.zeros(3)})
    before = path.read_bytes()
    with pytest.raises(StorageError, match="already exists"):
        seal_dataset(path, key, {"x": np.ones(5)})
    assert path.read_bytes() == before
    second = seal_dataset(path, key, {"x": np.ones(5)}, overwrite=True)
    with SealedDataset(path, key, expect_id=second) as ds:
        assert len(ds) == 5 and first != second
    assert sorted(p.name for p in shm_dir.iterdir()) == ["x.pld"]


def test_missing_directory_and_directory_target(shm_dir: Path, key: MasterKey) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        seal_dataset(shm_dir / "nope" / "x.pld", key, {"x": np.zeros(3)})
    with pytest.raises(StorageError, match="directory"):
        seal_dataset(shm_dir, key, {"x": np.zeros(3)}, overwrite=True)


def test_interrupted_seal_leaves_nothing(shm_dir: Path, key: MasterKey) -> None:
    path = shm_dir / "x.pld"

    def boom(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        seal_dataset(path, key, {"x": np.zeros((100, 8))}, chunk_records=10, progress=boom)
    assert list(shm_dir.iterdir()) == []
    # With an existing file and overwrite=True, the old file survives intact.
    seal_dataset(path, key, {"x": np.ones((4, 8))})
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        seal_dataset(
            path, key, {"x": np.zeros((100, 8))}, chunk_records=10, progress=boom, overwrite=True
        )
    assert path.read_bytes() == before
    assert [p.name for p in shm_dir.iterdir()] == ["x.pld"]


def test_killed_seal_never_leaves_a_file_that_opens(shm_dir: Path, key: MasterKey) -> None:
    """A child process dies (os._exit, like SIGKILL) in the middle of sealing."""
    path = shm_dir / "x.pld"
    x = np.arange(4000, dtype=np.float32).reshape(100, 40)

    for stop in (1, 50, 100):  # after the first chunk, midway, after the last chunk

        def die(done: int, total: int, stop: int = stop) -> None:
            if done >= stop:
                os._exit(3)

        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                seal_dataset(path, key, {"x": x}, chunk_records=10, progress=die)
            finally:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 3
        assert not path.exists()
        leftovers = list(shm_dir.iterdir())
        assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")
        # The temporary file holds encrypted chunks but no header: it never opens.
        with pytest.raises(FormatError):
            SealedDataset(leftovers[0], key)
        leftovers[0].unlink()


def test_sealed_file_mode_is_private(shm_dir: Path, key: MasterKey) -> None:
    seal_dataset(shm_dir / "p.pld", key, {"x": np.zeros(3)})
    assert (shm_dir / "p.pld").stat().st_mode & 0o077 == 0


def test_open_errors(shm_dir: Path, key: MasterKey) -> None:
    with pytest.raises(StorageError, match="cannot open"):
        SealedDataset(shm_dir / "missing.pld", key)
    (shm_dir / "empty").write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        SealedDataset(shm_dir / "empty", key)
    (shm_dir / "junk").write_bytes(b"hello world, not a dataset" * 10)
    with pytest.raises(FormatError, match="not a plinius sealed dataset"):
        SealedDataset(shm_dir / "junk", key)
    (shm_dir / "mirror").write_bytes(b"PLINIUSM" + bytes(100))
    with pytest.raises(FormatError, match="mirror"):
        SealedDataset(shm_dir / "mirror", key)


# -- inspect -------------------------------------------------------------------


def test_inspect_with_and_without_key(shm_dir: Path, key: MasterKey, other_key: MasterKey) -> None:
    path = shm_dir / "d.pld"
    dsid = seal_dataset(
        path,
        key,
        {"image": np.zeros((10, 8, 8), np.uint8), "label": np.arange(10)},
        chunk_records=4,
    )
    lines = inspect_dataset(path, key)
    text = "\n".join(lines)
    assert "format version 1" in text
    assert f"dataset id: {dsid}" in text
    assert f"key fingerprint: {key.fingerprint.hex()}" in text
    assert "records: 10" in text
    assert "3 chunks of 4 records (last: 2)" in text
    assert "image: uint8 (8, 8), 64 B/record" in text
    assert "label: int64 (), 8 B/record" in text
    assert "all 3 x 2 verified" in text
    plain = "\n".join(inspect_dataset(path, None))
    assert "NOT authenticated" in plain and "verified" not in plain
    assert f"dataset id: {dsid}" in plain
    with pytest.raises(WrongKeyError):
        inspect_dataset(path, other_key)
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    assert "NOT authenticated" in "\n".join(inspect_dataset(path, None))
    with pytest.raises(PliniusError, match="chunk 2 of field 'label'"):
        inspect_dataset(path, key)
    path.write_bytes(bytes(data[:-1]))
    assert "truncated or extended" in "\n".join(inspect_dataset(path, None))
