"""The public surface: a pinned, sorted ``__all__`` whose every name resolves, imported
lazily, documented, and reporting a public home as its ``__module__``."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from types import ModuleType

import pytest

import plinius

# The contract. A name added or removed here is an API change: say so in the README.
PUBLIC = [
    "AttestationError",
    "ConfigError",
    "Counter",
    "DatasetIndexError",
    "FileCounter",
    "FitResult",
    "FormatError",
    "IntegrityError",
    "KeyFileError",
    "KeyReleaseError",
    "MasterKey",
    "Mirror",
    "MirrorInfo",
    "PendingSave",
    "PliniusError",
    "RNGState",
    "ResumableLoader",
    "RollbackError",
    "SealedDataset",
    "SealedSampler",
    "StateMismatchError",
    "StepEvent",
    "StorageError",
    "WrongKeyError",
    "__version__",
    "fit",
    "seal_dataset",
]


def test_all_is_pinned_sorted_and_unique() -> None:
    assert plinius.__all__ == PUBLIC
    assert sorted(PUBLIC) == PUBLIC


def test_dir_is_the_public_surface() -> None:
    assert dir(plinius) == plinius.__all__


def test_every_lazy_name_is_public() -> None:
    assert set(plinius._LAZY) <= set(plinius.__all__)


@pytest.mark.parametrize("name", plinius.__all__)
def test_every_public_name_resolves_and_is_documented(name: str) -> None:
    # No skip for a module "not written yet": a failing import is a real failure.
    module = plinius._LAZY.get(name)
    value = getattr(plinius, name)
    assert value is not None
    if module is not None:
        assert value is getattr(importlib.import_module(f"plinius.{module}"), name)
    if name != "__version__":
        assert getattr(value, "__doc__", None), f"plinius.{name} needs a docstring"


def _public_modules() -> list[ModuleType]:
    """Every plinius module whose dotted name has no private (underscore) part."""
    out = [plinius]
    for info in pkgutil.walk_packages(plinius.__path__, "plinius."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            out.append(importlib.import_module(info.name))
        except ModuleNotFoundError as exc:
            # Only an optional third-party extra may be missing (tpm2-pytss).
            if exc.name is None or exc.name.startswith("plinius"):
                raise
    return out


def _exported(mod: ModuleType) -> list[tuple[str, object]]:
    return [(n, getattr(mod, n)) for n in getattr(mod, "__all__", []) if n != "__version__"]


def test_public_names_report_a_public_home() -> None:
    # Users (and tracebacks, reprs, docs) never see a private module as a class's home.
    private = [
        f"{mod.__name__}.{name} reports {value.__module__}"
        for mod in _public_modules()
        for name, value in _exported(mod)
        if isinstance(getattr(value, "__module__", None), str)
        and (callable(value) or isinstance(value, type))
        and any(p.startswith("_") for p in value.__module__.split("."))
    ]
    assert private == []


def test_every_public_module_has_a_sorted_all_that_resolves() -> None:
    for mod in _public_modules():
        names = getattr(mod, "__all__", None)
        if names is None:
            continue
        assert len(set(names)) == len(names), mod.__name__
        for n in names:
            assert hasattr(mod, n), f"{mod.__name__}.__all__ names {n!r}, which is missing"


def test_version_matches_the_installed_metadata() -> None:
    from importlib.metadata import version

    assert plinius.__version__ == version("plinius")


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = plinius.nope  # type: ignore[attr-defined]
    assert not hasattr(plinius, "nope")


def test_import_is_lazy_and_pulls_no_torch() -> None:
    # Recovery after a crash starts with `import plinius`: it must stay cheap.
    code = (
        "import sys, plinius; from plinius import MasterKey, PliniusError; "
        "print(','.join(m for m in ('torch', 'numpy', 'plinius.mirror', 'plinius.train') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == ""
