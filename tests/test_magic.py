"""``plinius._magic``: every file magic in one place, and naming a file by its magic."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import plinius
from plinius import _magic

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
SRC = Path(plinius.__file__).parent


def test_magics_are_distinct_and_eight_bytes() -> None:
    magics = [_magic.MIRROR, _magic.DATASET, _magic.SEALED_KEY]
    assert len(set(magics)) == 3
    assert all(len(m) == _magic.MAGIC_LEN == 8 for m in magics)
    # The bytes written before the change (file formats must not move).
    assert magics == [b"PLINIUSM", b"PLINIUSD", b"PLNSEAL\0"]


def test_sniff_names_the_golden_files() -> None:
    assert _magic.sniff(GOLDEN / "mirror.plm") == "mirror"
    assert _magic.sniff(GOLDEN / "data.pld") == "dataset"


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"PLNSEAL\0" + b"\x01rest", "sealed-key"),
        (b"PLINIUSM", "mirror"),
        (b"PLINIUS", None),  # shorter than a magic
        (b"", None),
        (b"PLINIUSX" + bytes(100), None),
        (b"\x89PNG\r\n\x1a\n", None),
    ],
)
def test_sniff_reads_only_the_magic(tmp_path: Path, content: bytes, kind: str | None) -> None:
    p = tmp_path / "f"
    p.write_bytes(content)
    assert _magic.sniff(p) == kind
    assert _magic.kind_of(content) == kind


def test_sniff_raises_oserror_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _magic.sniff(tmp_path / "missing")


def test_the_magics_are_written_nowhere_else() -> None:
    literals = {_magic.MIRROR, _magic.DATASET, _magic.SEALED_KEY}
    found = []
    for f in SRC.rglob("*.py"):
        if f.name == "_magic.py" and f.parent == SRC:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and node.value in literals:
                found.append(f"{f.relative_to(SRC)}:{node.lineno}")
    assert found == []


def test_magic_imports_nothing_of_plinius() -> None:
    tree = ast.parse((SRC / "_magic.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("plinius")
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("plinius") for a in node.names)
