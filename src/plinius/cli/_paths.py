"""One file named by two options: the check every command runs on its path options.

A command that appends to ``--events`` or ``--audit-log``, writes ``--out``,
``--sealed-key`` or a ``--counter file:`` file, or creates ``--identity``
would damage whatever else the same path names: events appended to the master
key or to the counter file, a sealed key written over the mirror. Each command
calls :func:`check_distinct_paths` with all of its path options, before it
opens anything, and is refused (a usage error, exit 2) naming both options and
the path.

Two options name the same file when

* both exist and are the same inode (``st_dev`` and ``st_ino``): hard links,
  symbolic links and relative spellings included;
* one or both do not exist yet (``--events`` naming the counter file before the
  first increment creates it): their real paths, symbolic links resolved, are
  equal.

A directory option may own some of the names inside it (``keyserver
--counter-dir`` keeps ``.lock`` and one ``<40 hex digits>.json`` per job
there, rewritten by rename): a file option that is such a name there, or the
directory itself, is refused too. Other files may live in that directory.

Which pairs may legitimately be equal: one only, ``keyserver --tls-cert``
and ``--tls-key``, both read-only inputs, because one PEM file holding the
certificate chain and its private key is a common form (Python's
``load_cert_chain`` accepts the same file twice); a command passes such pairs
as ``allowed``. Every other pair is refused. Most are an input and an output
(the output would damage the input); the remaining pairs of two inputs (``seal
--idx-images`` and ``--idx-labels``, ``--key`` and ``--data``, ``--key`` and
``--policy``) are refused as well: an image file is never its own label file
and a key file is never a dataset or a policy, so the only effect of allowing
them would be a later, vaguer error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import click

__all__ = [
    "check_distinct_paths",
    "counter_file",
    "job_paths",
    "owned_by_counter_dir",
    "same_file",
]


def counter_file(spec: str | None) -> Path | None:
    """The file a ``--counter file:PATH`` spec names (``None`` for any other spec)."""
    if spec is None:
        return None
    kind, _, arg = spec.partition(":")
    return Path(arg) if kind == "file" and arg else None


_COUNTER_DIR_NAMES = re.compile(r"\.lock|\.?[0-9a-f]{40}\.json(\.[0-9a-f]{8}\.tmp)?")


def owned_by_counter_dir(name: str) -> bool:
    """Whether the key server's counter store may create or rewrite ``name`` in its directory."""
    return _COUNTER_DIR_NAMES.fullmatch(name) is not None


def _real(p: Path) -> str:
    return os.path.realpath(os.path.abspath(p))


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file, existing or not (see the module).

    Args:
        a: a path.
        b: another path.

    Returns:
        True for one inode (both exist), or one real path (one or both missing).
    """
    try:
        sa = os.stat(a)
        sb = os.stat(b)
    except OSError:
        return _real(a) == _real(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _inside(p: Path, directory: Path, owns: Callable[[str], bool]) -> bool:
    """Whether ``p`` is ``directory`` itself or a name ``directory``'s option owns in it."""
    if same_file(p, directory):
        return True
    real = Path(_real(p))
    return same_file(real.parent, directory) and owns(real.name)


def check_distinct_paths(
    files: Mapping[str, Path | None],
    dirs: Mapping[str, tuple[Path | None, Callable[[str], bool]]] | None = None,
    *,
    allowed: frozenset[frozenset[str]] = frozenset(),
) -> None:
    """Refuse one file named by two path options (or by a file and a directory option).

    Args:
        files: each file option's name as the user typed it (``"--events"``,
            ``"--counter file:"``, ``"MIRROR"``) and its path, or ``None`` when
            not given.
        dirs: each directory option's name, its path (or ``None``) and which
            names inside it the command owns.
        allowed: pairs of option names that may name one file (read-only
            inputs only; see the module).

    Raises:
        click.UsageError: two options name the same file (exit 2); the message
            names both and the path.
    """
    given = [(name, p) for name, p in files.items() if p is not None]
    for i, (a, pa) in enumerate(given):
        for b, pb in given[i + 1 :]:
            if frozenset((a, b)) not in allowed and same_file(pa, pb):
                raise click.UsageError(
                    f"{a} and {b} name the same file ({pb}); give each its own file"
                )
    for dname, (dpath, owns) in (dirs or {}).items():
        if dpath is None:
            continue
        for name, p in given:
            if _inside(p, dpath, owns):
                raise click.UsageError(
                    f"{name} {p} is {dname} {dpath} or a file it keeps; give a path outside it"
                )


def job_paths(
    *,
    key: Path | None,
    data: Path | None,
    mirror: Path | None,
    sealed_key: Path | None = None,
    counter_spec: str | None = None,
    events: Path | None = None,
    model: str | None = None,
) -> dict[str, Path | None]:
    """The path options of a command that runs or reads a job (train, evaluate, crash-test).

    Includes what the options imply: the ``PATH.simkey`` a simulated sealed key
    keeps beside ``--sealed-key``, and ``--model`` when it names a cfg file.
    """
    cfg = Path(model) if model is not None and (model.endswith(".cfg") or os.sep in model) else None
    return {
        "--key": key,
        "--data": data,
        "--mirror": mirror,
        "--sealed-key": sealed_key,
        "--sealed-key's .simkey": (
            Path(f"{os.fspath(sealed_key)}.simkey") if sealed_key is not None else None
        ),
        "--counter file:": counter_file(counter_spec),
        "--events": events,
        "--model": cfg,
    }
