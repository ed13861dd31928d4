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
