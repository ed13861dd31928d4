"""The persistent region: creation, mapping, persistence, growth and misuse."""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from plinius import pmem
from plinius.errors import PliniusError, StorageError
from plinius.pmem import PAGE, Region, describe_path


def _address(buf: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _rss_of_mapping(addr: int) -> int:
    """Resident bytes of the mapping that starts at ``addr`` (from /proc/self/smaps)."""
    current = False
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                current = int(head.split("-")[0], 16) == addr
            elif current and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found in /proc/self/smaps")


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --- create ------------------------------------------------------------------


def test_create_maps_zeroed_prefaulted_private_file(shm_dir: Path) -> None:
    size = 64 * PAGE
    with Region.create(shm_dir / "r.plm", size) as r:
        assert r.size == size and not r.readonly and r.path == shm_dir / "r.plm"
        assert bytes(r.buf) == bytes(size)
        if Path("/proc/self/smaps").exists():
            # MAP_POPULATE: every page is mapped before the first access.
            assert _rss_of_mapping(_address(r.buf)) == size
    st_ = (shm_dir / "r.plm").stat()
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert st_.st_size == size
    assert _leftovers(shm_dir) == ["r.plm"]


def test_create_mode_is_0600_whatever_the_umask(shm_dir: Path) -> None:
    old = os.umask(0)
    try:
        Region.create(shm_dir / "r", 100).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((shm_dir / "r").stat().st_mode) == 0o600


def test_create_runs_init_and_persists_its_writes(shm_dir: Path) -> None:
    def init(r: Region) -> None:
        r.buf[:5] = b"hello"
        r.buf[-3:] = b"end"

    Region.create(shm_dir / "r", 3 * PAGE + 7, init).close()
    with Region.open(shm_dir / "r", readonly=True) as r:
        assert bytes(r.buf[:5]) == b"hello" and bytes(r.buf[-3:]) == b"end"


def test_create_is_atomic_when_init_fails(shm_dir: Path) -> None:
    seen: list[Path] = []

    def init(r: Region) -> None:
        seen.extend(shm_dir.iterdir())
        raise RuntimeError("init failed")

    with pytest.raises(RuntimeError, match="init failed"):
        Region.create(shm_dir / "r", 4096, init)
    # While init ran, the file existed only under a temporary name.
    assert len(seen) == 1 and seen[0].name != "r" and seen[0].name.startswith(".r.")
    assert _leftovers(shm_dir) == []


def test_create_cleans_up_even_with_a_live_export(shm_dir: Path) -> None:
    # PickleBuffer is only a stand-in for any C extension that holds a Py_buffer
    # on the view (nothing is pickled): closing the half-made region must not
    # fail and must still remove the temporary file.
    holder: list[pickle.PickleBuffer] = []

    def init(r: Region) -> None:
        holder.append(pickle.PickleBuffer(r.buf))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Region.create(shm_dir / "r", 4096, init)
    assert _leftovers(shm_dir) == []
    assert bytes(holder[0].raw()[:4]) == bytes(4)  # the held view still reads safely


def test_create_refuses_existing_path_and_keeps_it(shm_dir: Path) -> None:
    target = shm_dir / "r"
    target.write_bytes(b"precious")
    with pytest.raises(StorageError, match="already exists"):
        Region.create(target, 4096)
    assert target.read_bytes() == b"precious"
    assert _leftovers(shm_dir) == ["r"]


def test_create_refuses_a_dangling_symlink(shm_dir: Path) -> None:
    link = shm_dir / "r"
    link.symlink_to(shm_dir / "elsewhere")
    with pytest.raises(StorageError):
        Region.create(link, 4096)
    assert _leftovers(shm_dir) == ["r"] and not (shm_dir / "elsewhere").exists()


def test_create_overwrite_replaces(shm_dir: Path) -> None:
    target = shm_dir / "r"
    target.write_bytes(b"old")
    with Region.create(target, 2 * PAGE, overwrite=True) as r:
        assert r.size == 2 * PAGE and bytes(r.buf[:3]) == bytes(3)
    assert _leftovers(shm_dir) == ["r"]


def test_create_in_missing_directory_is_a_clear_storage_error(shm_dir: Path) -> None:
    with pytest.raises(StorageError, match=r"does not exist; create it first") as info:
        Region.create(shm_dir / "missing" / "r.plm", 4096)
    assert "missing" in str(info.value)


@pytest.mark.parametrize("size", [0, -1])
def test_create_refuses_non_positive_size(shm_dir: Path, size: int) -> None:
    with pytest.raises(ValueError):
        Region.create(shm_dir / "r", size)
    assert _leftovers(shm_dir) == []


# --- open ------------------------------------------------------------------------


def test_open_sees_what_was_persisted(shm_dir: Path) -> None:
    with Region.create(shm_dir / "r", 2 * PAGE) as r:
        r.buf[100:104] = b"data"
        r.persist(100, 4)
    with Region.open(shm_dir / "r") as r:
        assert bytes(r.buf[100:104]) == b"data" and r.size == 2 * PAGE and not r.readonly


def test_open_readonly_refuses_every_write(shm_dir: Path) -> None:
    Region.create(shm_dir / "r", PAGE, lambda r: r.buf.__setitem__(slice(0, 2), b"ok")).close()
    with Region.open(shm_dir / "r", readonly=True) as r:
        assert r.readonly and r.buf.readonly and bytes(r.buf[:2]) == b"ok"
        with pytest.raises(TypeError):
            r.buf[0] = 1
        with pytest.raises(TypeError):
            r.buf[0:2] = b"no"
        with pytest.raises(StorageError, match="read-only"):
            r.persist(0, 1)
        with pytest.raises(StorageError, match="read-only"):
            r.grow(2 * PAGE)
        assert r.size == PAGE
    assert (shm_dir / "r").read_bytes()[:2] == b"ok"


def test_open_missing_file(shm_dir: Path) -> None:
    with pytest.raises(StorageError, match="exist"):
        Region.open(shm_dir / "absent")


def test_open_empty_file(shm_dir: Path) -> None:
    (shm_dir / "empty").touch()
    for ro in (False, True):
        with pytest.raises(StorageError, match="empty"):
            Region.open(shm_dir / "empty", readonly=ro)


def test_open_directory_and_fifo_are_refused(shm_dir: Path) -> None:
    (shm_dir / "d").mkdir()
    with pytest.raises(StorageError):
        Region.open(shm_dir / "d")
    with pytest.raises(StorageError, match="not a regular file"):
        Region.open(shm_dir / "d", readonly=True)
    os.mkfifo(shm_dir / "f")
    for ro in (False, True):
        with pytest.raises(StorageError, match="not a regular file"):
            Region.open(shm_dir / "f", readonly=ro)  # must not block on the FIFO


def test_open_file_not_a_multiple_of_the_page_size(shm_dir: Path) -> None:
    size = 3 * PAGE + 123
    data = bytes(i % 251 for i in range(size))
    (shm_dir / "odd").write_bytes(data)
    with Region.open(shm_dir / "odd") as r:
        assert r.size == size and bytes(r.buf) == data
        r.buf[size - 5 :] = b"TAIL!"
        r.persist(size - 5, 5)  # the last, partial page
        r.persist(size - 1, 1)
        r.persist(0, size)
        r.persist(PAGE + 1, 2 * PAGE)  # unaligned start, crossing pages
    assert (shm_dir / "odd").read_bytes()[-5:] == b"TAIL!"


def _start_of(buf: memoryview) -> int:
    """The address a (possibly read-only) view starts at."""
    return int(np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0])


def _resident_pages(buf: memoryview, pages: int) -> bool:
    """Whether about ``pages`` pages of the mapping are resident: a fault maps up to
    64 KiB of neighbouring pages already in the page cache (the kernel's fault-around)."""
    rss = _rss_of_mapping(_start_of(buf))
    return pages * PAGE <= rss <= pages * PAGE + (64 << 10)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
@pytest.mark.parametrize("ro", [False, True], ids=["rw", "ro"])
def test_open_without_populate_prefaults_only_what_is_asked(shm_dir: Path, ro: bool) -> None:
    p = shm_dir / "r"
    Region.create(p, 4 * PAGE, lambda r: r.buf.__setitem__(slice(0, 3), b"hdr")).close()
    os.truncate(p, 1 << 30)  # a sparse hole: 1 GiB that costs nothing until touched
    blocks = p.stat().st_blocks * 512
    with Region.open(p, readonly=ro, populate=False) as r:
        assert r.size == 1 << 30 and r.populated == 0
        assert _rss_of_mapping(_start_of(r.buf)) == 0
        r.populate(16 * PAGE + 1)
        assert r.populated == 16 * PAGE + 1
        assert _resident_pages(r.buf, 17)
        r.populate(8 * PAGE)  # already: nothing to do
        assert _resident_pages(r.buf, 17)
        assert bytes(r.buf[:3]) == b"hdr"
    assert p.stat().st_blocks * 512 - blocks <= 17 * PAGE
    os.truncate(p, 8 * PAGE)
    with Region.open(p, readonly=ro, populate=False) as r:
        r.populate(1 << 40)  # clipped to the region
        assert r.populated == 8 * PAGE
        assert _resident_pages(r.buf, 8)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_growing_a_partly_populated_region_prefaults_that_part_again(shm_dir: Path) -> None:
    p = shm_dir / "r"
    Region.create(p, 64 * PAGE).close()
    with Region.open(p, populate=False) as r:
        r.populate(4 * PAGE)
        r.grow(128 * PAGE)
        assert r.populated == 4 * PAGE
        assert _resident_pages(r.buf, 4)
        r.populate(128 * PAGE)
        r.grow(256 * PAGE)  # fully pre-faulted: stays so
        assert r.populated == 256 * PAGE
        assert _resident_pages(r.buf, 256)
    with Region.create(shm_dir / "c", 8 * PAGE) as r:
        assert r.populated == 8 * PAGE


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_populate_falls_back_to_touching_pages_on_old_kernels(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pmem, "_MADV_POPULATE_READ", 0x7FFF)  # unknown advice: EINVAL
    Region.create(shm_dir / "r", 32 * PAGE).close()
    with Region.open(shm_dir / "r", readonly=True, populate=False) as r:
        r.populate(5 * PAGE)
        assert _resident_pages(r.buf, 5)
    r.close()
    with pytest.raises(StorageError, match="closed"):
        r.populate(PAGE)


# --- persist ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"), [(-1, 1), (0, -1), (0, 2 * PAGE + 1), (2 * PAGE, 1), (PAGE, PAGE + 1)]
)
def test_persist_refuses_ranges_outside_the_region(shm_dir: Path, offset: int, length: int) -> None:
    with Region.create(shm_dir / "r", 2 * PAGE) as r, pytest.raises(ValueError, match="outside"):
        r.persist(offset, length)


@pytest.mark.parametrize(
    ("offset", "length"), [(0, 0), (2 * PAGE, 0), (0, 1), (1, 1), (PAGE - 1, 2), (7, 2 * PAGE - 7)]
)
def test_persist_accepts_any_range_inside(shm_dir: Path, offset: int, length: int) -> None:
    # Unaligned ranges are widened to whole pages for msync; what was written
    # must be in the file afterwards, and nothing outside the range changes.
    data = bytes((offset + i) % 251 for i in range(length))
    with Region.create(shm_dir / "r", 2 * PAGE) as r:
        r.buf[offset : offset + length] = data
        r.persist(offset, length)
    raw = (shm_dir / "r").read_bytes()
    assert raw[offset : offset + length] == data
    assert raw[:offset] == bytes(offset) and raw[offset + length :] == bytes(
        2 * PAGE - offset - length
    )


def test_is_pmem_is_false_without_dax(shm_dir: Path) -> None:
    with Region.create(shm_dir / "r", PAGE) as r:
        assert r.is_pmem is False  # /dev/shm is tmpfs: MAP_SYNC is refused there


# --- grow --------------------------------------------------------------------------


def test_grow_while_mapped_keeps_data_and_zero_fills(shm_dir: Path) -> None:
    with Region.create(shm_dir / "r", PAGE + 10) as r:
        r.buf[: PAGE + 10] = b"\x5a" * (PAGE + 10)
        r.persist(0, PAGE + 10)
        before = r.buf
        old_slice = r.buf[PAGE : PAGE + 10]
        r.grow(5 * PAGE + 3)
        assert r.size == 5 * PAGE + 3 and (shm_dir / "r").stat().st_size == 5 * PAGE + 3
        assert bytes(r.buf[: PAGE + 10]) == b"\x5a" * (PAGE + 10)
        assert bytes(r.buf[PAGE + 10 :]) == bytes(4 * PAGE - 7)
        # A slice taken before growing still refers to the old mapping of the
        # same file: readable, and its writes reach the file.
        assert bytes(old_slice) == b"\x5a" * 10
        old_slice[:2] = b"OK"
        assert bytes(r.buf[PAGE : PAGE + 2]) == b"OK"
        # The region's own previous view object is released, cleanly.
        with pytest.raises(ValueError, match="released"):
            bytes(before)
        r.buf[-3:] = b"new"
        r.persist(r.size - 3, 3)
        r.grow(PAGE)  # shrinking is a no-op
        assert r.size == 5 * PAGE + 3
    with Region.open(shm_dir / "r") as r:
        assert bytes(r.buf[-3:]) == b"new" and bytes(r.buf[PAGE : PAGE + 2]) == b"OK"


def test_grow_with_a_live_export_succeeds(shm_dir: Path) -> None:
    with Region.create(shm_dir / "r", PAGE) as r:
        r.buf[:3] = b"abc"
        held = pickle.PickleBuffer(r.buf)  # a held Py_buffer (see above)
        r.grow(3 * PAGE)
        assert r.size == 3 * PAGE and bytes(r.buf[:3]) == b"abc"
        assert bytes(held.raw()[:3]) == b"abc"
    # close() with the old mapping still exported does not fail either.
    assert bytes(held.raw()[:3]) == b"abc"


# --- close -------------------------------------------------------------------------


def test_close_with_live_views_is_safe_and_releases_the_fd(shm_dir: Path) -> None:
    r = Region.create(shm_dir / "r", PAGE)
    r.buf[:4] = b"live"
    sliced = r.buf[:4]
    held = pickle.PickleBuffer(r.buf)
    fd = r._fd
    r.close()
    assert r._fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    # The views keep their mapping alive: reading them never touches unmapped memory.
    assert bytes(sliced) == b"live" and bytes(held.raw()[:4]) == b"live"
    with pytest.raises(StorageError, match="closed"):
        _ = r.buf
    with pytest.raises(StorageError, match="closed"):
        r.persist(0, 1)
    with pytest.raises(StorageError):
        r.grow(2 * PAGE)
    r.close()  # idempotent
    assert "size=0" in repr(r)


def test_repr_names_path_size_and_mode(shm_dir: Path) -> None:
    with Region.create(shm_dir / "r", PAGE) as r:
        assert repr(r) == f"Region({str(shm_dir / 'r')!r}, size={PAGE}, rw)"
    with Region.open(shm_dir / "r", readonly=True) as r:
        assert repr(r).endswith("ro)")


def test_errors_are_plinius_errors(shm_dir: Path) -> None:
    with pytest.raises(PliniusError):
        Region.open(shm_dir / "absent")


# --- where the region lives ----------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this system")
def test_describe_path_dev_shm(shm_dir: Path) -> None:
    text = describe_path(shm_dir / "r.plm")
    assert text.startswith("tmpfs /dev/shm") and "emulated" in text and "power cut" in text
    assert describe_path("/dev/shm") == describe_path(shm_dir)


def test_describe_path_normal_directory(tmp_path: Path) -> None:
    fstype = pmem.mount_of(tmp_path).fstype
    text = describe_path(tmp_path / "r.plm")
    if fstype == "tmpfs":
        assert "emulated" in text
    else:
        assert text.startswith(fstype) and "page cache" in text and "msync" in text


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        ("rw,relatime,dax", "always"),
        ("rw,dax=always", "always"),
        ("rw,relatime,dax=inode", "inode"),
        ("rw,dax=never", None),
        ("rw,relatime", None),
        ("rw,daxfoo", None),
    ],
)
def test_dax_mount_options(opts: str, expected: str | None) -> None:
    assert pmem.dax_option(opts) == expected


def test_describe_path_dax_mount(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(
        pmem, "mount_of", lambda _p: pmem.Mount("/mnt/pmem0", "ext4", "rw,dax=always", "/dev/pmem0")
    )
    text = describe_path(tmp_path)
    assert text.startswith("DAX mount /mnt/pmem0 (ext4): real persistent memory")
    assert ("with libpmem" in text) == (pmem._load_libpmem() is not None)


def test_libpmem_absence_is_not_an_error() -> None:
    lib = pmem._load_libpmem()
    assert lib is None or hasattr(lib, "pmem_persist")


# --- a real crash -----------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from plinius.pmem import Region
    r = Region.create(sys.argv[1], 3 * 4096 + 100)
    r.buf[10:20] = b"persisted!"
    r.persist(10, 10)
    r.buf[5000:5008] = b"unpersis"  # written, never persisted
    r.buf[-4:] = b"tail"
    r.persist(r.size - 4, 4)
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_persisted_data_survives_sigkill(shm_dir: Path) -> None:
    path = shm_dir / "crash.plm"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == "ready\n"
    with Region.open(path, readonly=True) as r:
        assert bytes(r.buf[10:20]) == b"persisted!"
        assert bytes(r.buf[-4:]) == b"tail"
        # On tmpfs a process crash loses nothing: even unpersisted stores are in
        # the shared page cache. (A power cut would lose everything there.)
        assert bytes(r.buf[5000:5008]) == b"unpersis"


# --- long names (issue 17, item 6) -----------------------------------------------


def test_a_legal_250_character_name_is_created(shm_dir: Path) -> None:
    # The temporary name used to be the final name plus 14 characters: over
    # NAME_MAX (255), so a legal name failed with "File name too long".
    long = shm_dir / ("m" * 250)
    with Region.create(long, PAGE) as r:
        assert r.path == long
    assert long.exists()
    assert [p.name for p in shm_dir.iterdir()] == [long.name]  # no temporary left


def test_a_255_byte_multibyte_name_is_created(shm_dir: Path) -> None:
    name = "é" * 127 + "x"  # 255 bytes in UTF-8: the temporary name is cut at a byte
    with Region.create(shm_dir / name, PAGE):
        pass
    assert [p.name for p in shm_dir.iterdir()] == [name]


def test_write_atomic_takes_a_legal_250_character_name(shm_dir: Path) -> None:
    from plinius._fsutil import write_atomic

    target = shm_dir / ("c" * 250)
    write_atomic(target, b"7\n", what="counter file")
    write_atomic(target, b"8\n", what="counter file")
    assert target.read_bytes() == b"8\n"
    assert [p.name for p in shm_dir.iterdir()] == [target.name]
