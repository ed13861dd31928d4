"""The documents name tests that exist: every ``tests/PATH.py::name`` in docs/ and the README.

The threat model maps each attack to the test that plays it; a test renamed or
moved must not leave the table pointing at nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REF = re.compile(r"tests/([\w/]+\.py)(?:::(\w+))?")


def _references() -> list[tuple[str, str, str | None]]:
    out = []
    for doc in DOCS:
        for m in REF.finditer(doc.read_text(encoding="utf-8")):
            out.append((doc.name, m.group(1), m.group(2)))
    return sorted(set(out), key=lambda r: (r[0], r[1], r[2] or ""))


def _defined(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}


def test_the_documents_name_tests() -> None:
    assert len(_references()) > 50  # the threat model's table alone names many


@pytest.mark.parametrize(("doc", "file", "name"), _references())
def test_every_named_test_exists(doc: str, file: str, name: str | None) -> None:
    path = ROOT / "tests" / file
    assert path.is_file(), f"{doc} names tests/{file}, which does not exist"
    if name is not None:
        assert name in _defined(path), f"{doc} names tests/{file}::{name}, which does not exist"
