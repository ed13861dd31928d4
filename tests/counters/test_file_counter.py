"""The file counter (simulation only): reads, increments, atomicity and bad content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plinius.counters import Counter, FileCounter
from plinius.errors import FormatError, StorageError


def test_counts_from_zero_and_persists(tmp_path: Path) -> None:
    c = FileCounter(tmp_path / "ctr")
    assert c.read() == 0 and not (tmp_path / "ctr").exists()
    assert [c.increment() for _ in range(3)] == [1, 2, 3]
    assert c.read() == 3
    assert FileCounter(tmp_path / "ctr").read() == 3  # a new instance reads the file
    assert (tmp_path / "ctr").read_text() == "3\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctr"]  # no temp file left


def test_is_a_counter_and_says_it_is_insecure(tmp_path: Path) -> None:
    c = FileCounter(tmp_path / "ctr")
    assert isinstance(c, Counter)
    assert c.trusted is False and c.wears is False
    assert "insecure" in repr(c)


@pytest.mark.parametrize("content", ["", "\n", "-1\n", "+3", "1.5", "abc", "0x10", "1 2", "٣"])
def test_bad_content_is_a_format_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ctr"
    path.write_text(content, encoding="utf-8")
    c = FileCounter(path)
    with pytest.raises(FormatError, match=str(path)):
        c.read()
    with pytest.raises(FormatError):
        c.increment()
    assert path.read_text(encoding="utf-8") == content  # nothing overwritten


def test_binary_garbage_is_a_format_error(tmp_path: Path) -> None:
    (tmp_path / "ctr").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FormatError):
        FileCounter(tmp_path / "ctr").read()


def test_update_is_atomic_replace(tmp_path: Path) -> None:
    path = tmp_path / "ctr"
    c = FileCounter(path)
    c.increment()
    ino = path.stat().st_ino
    c.increment()
    # A new file renamed over the old one, never the old one rewritten in place
    # (a crash mid-write would leave an empty or torn counter).
    assert path.stat().st_ino != ino


def test_failed_update_keeps_value_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ctr"
    c = FileCounter(path)
    c.increment()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="free some space"):
        c.increment()
    monkeypatch.undo()
    assert c.read() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctr"]


def test_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    c = FileCounter(tmp_path / "no" / "ctr")
    assert c.read() == 0
    with pytest.raises(StorageError):
        c.increment()


_READ_FIFO = """
import sys
from plinius.counters import FileCounter
from plinius.errors import PliniusError
c = FileCounter(sys.argv[1])
for op in (c.read, c.increment):
    try:
        op()
    except PliniusError as exc:
        print(type(exc).__name__, exc)
    else:
        print("no error")
"""


def test_a_fifo_in_place_of_the_counter_file_is_refused_without_blocking(tmp_path: Path) -> None:
    # The attack: the host puts a FIFO where the counter file is; opening it for
    # reading would block until a writer appears, hanging the job forever. The
    # read runs in a subprocess with a timeout so that this test can never hang.
    import subprocess
    import sys

    fifo = tmp_path / "ctr"
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        out = subprocess.run(
            [sys.executable, "-c", _READ_FIFO, str(fifo)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("FileCounter blocked on a FIFO")
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert len(lines) == 2, out.stdout
    for line in lines:
        assert line.startswith("FormatError ") and "not a regular file" in line, line
    assert fifo.exists() and not fifo.is_file()  # nothing replaced it


def test_a_directory_in_place_of_the_counter_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ctr").mkdir()
    with pytest.raises(FormatError, match="not a regular file"):
        FileCounter(tmp_path / "ctr").read()
