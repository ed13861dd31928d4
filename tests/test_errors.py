"""The exception tree: one root, documented in errors.py's docstring, with helpful messages."""

from __future__ import annotations

import errno
import inspect

import pytest

from plinius import errors
from plinius.errors import (
    AttestationError,
    ConfigError,
    DarknetConfigError,
    DatasetIndexError,
    KeyReleaseError,
    PliniusError,
    StorageError,
    storage_error,
)

_CLASSES = [
    obj
    for _, obj in inspect.getmembers(errors, inspect.isclass)
    if obj.__module__ == errors.__name__
]


def test_all_lists_every_class_sorted() -> None:
    assert sorted(errors.__all__) == errors.__all__
    assert {c.__name__ for c in _CLASSES} == set(errors.__all__)


@pytest.mark.parametrize("cls", _CLASSES, ids=lambda c: c.__name__)
def test_every_class_is_a_plinius_error_drawn_in_the_docstring(cls: type) -> None:
    assert issubclass(cls, PliniusError) and issubclass(cls, Exception)
    assert cls.__doc__, f"{cls.__name__} needs a docstring"
    assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} missing from the drawn tree"


def test_special_parents() -> None:
    assert issubclass(DatasetIndexError, IndexError)
    with pytest.raises(IndexError):
        raise DatasetIndexError("index 10 out of range for 3 records")
    assert issubclass(DarknetConfigError, ConfigError)
    assert issubclass(KeyReleaseError, AttestationError)


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (errno.ENOENT, "check that the path and its directory exist"),
        (errno.ENOSPC, "free some space"),
        (errno.EDQUOT, "free some space"),
        (errno.EACCES, "permissions"),
        (errno.EPERM, "permissions"),
        (errno.EROFS, "read-only"),
        (errno.EEXIST, "remove the existing file"),
        (errno.EISDIR, "not a directory"),
        (errno.EIO, "check the path and the file system"),
    ],
)
def test_storage_error_says_what_failed_why_and_what_to_do(code: int, hint: str) -> None:
    exc = OSError(code, errno.errorcode[code].lower() + " text", "/some/file")
    err = storage_error(exc, "cannot create /some/file")
    assert isinstance(err, StorageError)
    text = str(err)
    assert text.startswith("cannot create /some/file: ")
    assert errno.errorcode[code].lower() + " text" in text
    assert hint in text
    assert "\n" not in text


def test_storage_error_without_errno() -> None:
    err = storage_error(OSError("odd failure"), "cannot map x")
    assert str(err) == "cannot map x: odd failure; check the path and the file system"
