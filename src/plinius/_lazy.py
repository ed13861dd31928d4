"""Lazy exports: a package names what it offers, and imports the module on first use.

``import plinius`` must not import torch (recovery after a crash starts with
it), and ``plinius.tee`` must not need the key server's web stack inside a TEE.
A package sets ``__getattr__ = lazy_exports(__name__, {"Name": "submodule"})``;
the first access imports the submodule and caches the value in the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` (PEP 562).

    Args:
        package: the package's ``__name__``.
        table: public name -> the submodule (relative to ``package``) that defines it.

    Returns:
        The function to assign to the package's ``__getattr__``: it imports the
        submodule, caches the value in the package and returns it, and raises
        ``AttributeError`` for any name not in ``table``.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
