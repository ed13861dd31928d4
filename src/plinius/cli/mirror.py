"""``plinius inspect`` (mirror or sealed dataset), ``ls`` and ``rm`` (a directory's mirrors and
datasets) and ``export`` (mirror to safetensors)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .._fsutil import fsync_dir
from .._magic import FileKind, sniff
from ..errors import ConfigError, FormatError, PliniusError, StorageError, storage_error
from ._freshness import (
    READ_COUNTER_HELP,
    counter_option,
    freshness_line,
    open_for_reading,
    unchecked_note,
)
from ._jobinfo import job_of, job_text
from ._json import echo_json, json_option
from ._paths import check_distinct_paths, counter_file

if TYPE_CHECKING:  # pragma: no cover
    from ..crypto import MasterKey
    from ..dist import SetView
    from ..mirror import Mirror


def register(group: click.Group) -> None:
    """Add the mirror commands to ``group``."""
    group.add_command(inspect)
    group.add_command(ls)
    group.add_command(rm)
    group.add_command(export)


def _when(t: float | None) -> str:
    if not t:
        return "never"
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def _kind(path: Path) -> FileKind | None:
    try:
        # A FIFO or device would block or never end: only regular files are opened.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise StorageError(f"{path} is not a regular file; give a mirror or dataset file")
        return sniff(path)
    except OSError as exc:
        raise storage_error(exc, f"cannot read {path}") from exc


class CounterSource:
    """``--counter`` of ``plinius export`` and ``inspect``, and the key server it may need."""

    def __init__(
        self, spec: str | None, url: str | None, pubkey: str | None, job_id: str | None
    ) -> None:
        if spec != "keyserver":
            stray = [f for f, v in (("--key-server", url), ("--key-server-pubkey", pubkey),
                                    ("--job-id", job_id)) if v is not None]  # fmt: skip
            if stray:
                verb = "applies" if len(stray) == 1 else "apply"
                raise click.UsageError(f"{', '.join(stray)} only {verb} to --counter keyserver")
        self.spec, self.url, self.pubkey, self.job_id = spec, url, pubkey, job_id

    def open(self, path: Path, key: MasterKey) -> Mirror | SetView:
        """Open the mirror at ``path`` read-only, checked against the counter if one is given."""
        return open_for_reading(path, key, self.spec, self.url, self.pubkey, self.job_id)


def _key_server_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(
        [
            click.option("--key-server", help="Key server URL (for --counter keyserver)."),
            click.option(
                "--key-server-pubkey",
                help="The key server's public key, hex (for --counter keyserver).",
            ),
            click.option(
                "--job-id", help="The job's id (for --counter keyserver; default: the file name)."
            ),
        ]
    ):
        f = opt(f)
    return f


def _read_verified(
    path: Path, key_path: Path, counter: CounterSource | None
) -> tuple[Any, list[Any], dict[str, Any], str | None]:
    """Open, verify and read a mirror for ``inspect``: (info, tensors, job, counter spec)."""
    from ..crypto import MasterKey

    source = counter or CounterSource(None, None, None, None)
    key = MasterKey.load(key_path)
    with source.open(path, key) as m:
        return m.verify(), m.committed_tensors(), job_of(m), source.spec


def mirror_lines(
    path: Path, key_path: Path | None, counter: CounterSource | None = None
) -> list[str]:
    """What ``plinius inspect`` prints for a mirror file."""
    from ..mirror import describe_file
    from ..pmem import describe_path

    h = describe_file(path)
    lines = [
        f"{path}: plinius mirror, format version {h.format_version}",
        f"  file size        {_size(h.file_bytes)} ({h.file_bytes} bytes)",
        f"  storage          {describe_path(path)}",
        f"  region id        {h.region_id.hex()}",
        f"  key fingerprint  {h.fingerprint.hex()}",
        f"  created          {_when(h.created_at)}",
        f"  committed        generation {h.generation} (manifest slot {h.slot})",
    ]
    if key_path is None:
        lines.append(
            "  the manifest (step, tensors, state) is encrypted: pass --key KEY to read and "
            "verify it; the superblock above was checked but not authenticated"
        )
        lines.append(
            "  freshness        NOT checked (needs --key, and --counter if the job used one)"
        )
        return lines
    info, tensors, job, spec = _read_verified(path, key_path, counter)
    lines += [
        f"  step             {info.step if info.step is not None else 'none (never saved)'}",
        f"  saved            {_when(info.saved_at)}",
    ]
    if job["model"] is not None:
        lines.append(f"  job              {job_text(job)}")
    lines += [
        f"  tensors          {info.num_tensors}, {_size(info.tensor_bytes)}",
    ]
    for t in tensors:
        shape = "x".join(str(d) for d in t.shape) or "scalar"
        kind = "" if t.kind == "torch" else f" ({t.kind})"
        lines.append(f"    {t.name}  {t.dtype}{kind}  {shape}  {_size(t.nbytes)}")
    lines.append(
        f"  verified: the superblock, the manifest and all {info.num_tensors} tensors "
        "authenticate under this key"
    )
    # What freshness means here comes last: it is the one check the tags cannot make.
    lines += [
        "  counter          "
        + (
            f"the job's policy: {info.counter_bound}, once checked against it "
            f"(this generation expects counter value {info.counter_expected})"
            if info.counter_expected is not None
            else info.counter_bound
        ),
        f"  freshness        {freshness_line(info, spec)}",
    ]
    return lines


def mirror_doc(
    path: Path, key_path: Path | None, counter: CounterSource | None = None
) -> dict[str, Any]:
    """What ``plinius inspect --json`` prints for a mirror file (keys in the README)."""
    from ..mirror import describe_file
    from ..pmem import describe_path

    h = describe_file(path)
    doc: dict[str, Any] = {
        "kind": "mirror",
        "path": str(path),
        "format_version": h.format_version,
        "file_bytes": h.file_bytes,
        "storage": describe_path(path),
        "region_id": h.region_id.hex(),
        "key_fingerprint": h.fingerprint.hex(),
        "created_at": h.created_at,
        "generation": h.generation,
        "slot": h.slot,
        "authenticated": False,
        "step": None,
        "saved_at": None,
        "num_tensors": None,
        "tensor_bytes": None,
        "tensors": None,
        "job": None,
        "counter": None,
        "freshness_checked": False,
    }
    if key_path is None:
        return doc
    info, tensors, job, spec = _read_verified(path, key_path, counter)
    doc.update(
        authenticated=True,
        generation=info.generation,
        step=info.step,
        saved_at=info.saved_at,
        num_tensors=info.num_tensors,
        tensor_bytes=info.tensor_bytes,
        tensors=[
            {
                "name": t.name,
                "kind": t.kind,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "nbytes": t.nbytes,
            }
            for t in tensors
        ],
        job=job,
        counter=info.counter_bound,
        freshness_checked=spec is not None,
    )
    return doc


@click.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Master key file: decrypt the manifest and verify every tag.",
)
@counter_option(READ_COUNTER_HELP + " Needs --key.")
@_key_server_options
@json_option
def inspect(
    path: Path,
    key_path: Path | None,
    counter_spec: str | None,
    key_server: str | None,
    key_server_pubkey: str | None,
    job_id: str | None,
    as_json: bool,
) -> None:
    """Describe a mirror file or a sealed dataset at PATH.

    Without --key, only what the plaintext header shows; with it, the step, the
    tensors (names, dtypes, shapes), and a check of every authentication tag;
    with --counter too, a check that the mirror is not a rolled-back copy.
    """
    source = CounterSource(counter_spec, key_server, key_server_pubkey, job_id)
    check_distinct_paths(
        {"PATH": path, "--key": key_path, "--counter file:": counter_file(counter_spec)}
    )
    if path.is_dir():
        if counter_spec is not None and key_path is None:
            raise click.UsageError(
                "--counter needs --key: the counter value a set expects is in its encrypted "
                "manifests"
            )
        doc = set_doc(path, key_path, source if counter_spec is not None else None)
        if as_json:
            echo_json(doc)
            return
        for line in set_lines(doc):
            click.echo(line)
        return
    kind = _kind(path)
    if counter_spec is not None and kind == "dataset":
        raise click.UsageError("--counter applies to mirrors only; PATH is a sealed dataset")
    if counter_spec is not None and key_path is None:
        raise click.UsageError(
            "--counter needs --key: the counter value a mirror expects is in its encrypted manifest"
        )
    if kind == "dataset":
        try:
            from ..data import inspect_dataset
        except ImportError as exc:
            raise FormatError(
                f"{path} is a sealed dataset, but this plinius has no dataset support"
            ) from exc
        from ..crypto import MasterKey

        key = MasterKey.load(key_path) if key_path is not None else None
        if as_json:
            from ..data import describe_dataset

            echo_json(describe_dataset(path, key))
            return
        lines = inspect_dataset(path, key)
    elif kind == "mirror":
        if as_json:
            echo_json(mirror_doc(path, key_path, source))
            return
        lines = mirror_lines(path, key_path, source)
    else:
        raise FormatError(
            f"{path} is neither a plinius mirror nor a sealed dataset (unknown header)"
        )
    for line in lines:
        click.echo(line)


def set_doc(
    path: Path, key_path: Path | None, counter: CounterSource | None = None
) -> dict[str, Any]:
    """What ``plinius inspect`` reads of a mirror set (a multi-process job's directory).

    With ``counter``, the set is checked against it as a whole (a rolled-back
    set, or one file of it, is a :class:`~plinius.errors.RollbackError`).
    """
    from ..crypto import MasterKey
    from ..dist import SetView, member_files
    from ..mirror import describe_file

    files = member_files(path)
    doc: dict[str, Any] = {
        "kind": "mirror-set",
        "path": str(path),
        "authenticated": False,
        "step": None,
        "processes": len(files),
        "members": [
            {
                "path": str(f),
                "local_rank": r,
                "generation": describe_file(f).generation,
                "step": None,
                "held": None,
            }
            for r, f in files
        ],
        "num_tensors": None,
        "tensor_bytes": None,
        "job": None,
        "world_changes": None,
        "world_size": None,
        "replicas": None,
        "counter_expected": None,
        "freshness_checked": counter is not None,
        "counter_spec": None if counter is None else counter.spec,
    }
    if key_path is None:
        return doc
    key = MasterKey.load(key_path)
    opened = counter.open(path, key) if counter is not None else SetView(path, key)
    assert isinstance(opened, SetView)
    with opened as view:
        info = view.verify()
        job = job_of(view)
        ident = next((m.identity for m in view.members if m.identity is not None), None)
        doc.update(
            authenticated=True,
            step=view.step,
            processes=len(view.members),
            # The job's processes on every machine (this directory holds this machine's),
            # and whether every save keeps each process's sealed replica (--replicas).
            world_size=None if ident is None else ident.get("world_size"),
            replicas=None if ident is None else int(ident.get("replicas", 0)),
            members=[
                {
                    "path": str(m.path),
                    "local_rank": m.local_rank,
                    "generation": m.generation,
                    "step": m.step,
                    "held": list(m.held),
                }
                for m in view.members
            ],
            num_tensors=info.num_tensors,
            tensor_bytes=info.tensor_bytes,
            job=job,
            # [step, from, to] for each change of the number of processes (--elastic)
            world_changes=(view.committed_value("dist") or {}).get("world_changes", []),
            counter_expected=info.counter_expected,
        )
    return doc


def set_lines(doc: dict[str, Any]) -> list[str]:
    """``plinius inspect``'s text for a mirror set, from :func:`set_doc`."""
    members = doc["members"]
    lines = [f"{doc['path']}: plinius mirror set, {len(members)} process files"]
    for m in members:
        name = Path(m["path"]).name
        if m["held"] is None:
            lines.append(f"  {name:<14} generation {m['generation']}")
            continue
        held = ["none" if h is None else str(h) for h in m["held"]]
        more = f" (and the previous step {held[1]})" if len(held) > 1 else ""
        lines.append(f"  {name:<14} generation {m['generation']}, step {held[0]}{more}")
    if not doc["authenticated"]:
        lines.append("  steps and tensors are encrypted: pass --key KEY to read and verify them")
        return lines
    step = doc["step"]
    lines.append(
        "  globally committed step "
        + (f"{step} (every process holds it: the job resumes there)" if step else "none")
    )
    if doc["job"]["model"] is not None:
        lines.append(f"  job              {job_text(doc['job'])}")
    for at, old, new in doc.get("world_changes") or []:
        lines.append(f"  world change     {old} -> {new} processes, resumed at step {at}")
    world = doc["world_size"]
    if isinstance(world, int) and world != len(members):
        lines.append(
            f"  processes        {len(members)} here, {world} in the job (the others' files "
            "are on their machines)"
        )
    if doc["replicas"] is not None:
        lines.append(
            "  replicas         "
            + (
                "kept: every save holds each process's sealed replica, so the job survives "
                "the loss of a machine (--replicas 1)"
                if doc["replicas"]
                else "none: a machine lost with its directory loses the job (--replicas 0)"
            )
        )
    lines.append(
        f"  verified: the {doc['num_tensors']} tensors ({_size(doc['tensor_bytes'])}) of "
        f"{Path(members[0]['path']).name} at that step authenticate under this key"
    )
    lines.append(f"  freshness        {_set_freshness(doc)}")
    return lines


def _set_freshness(doc: dict[str, Any]) -> str:
    """What ``plinius inspect`` says was checked about a set's freshness."""
    if doc["freshness_checked"]:
        return (
            f"checked against --counter {doc['counter_spec']}: the set's step expects counter "
            f"value {doc['counter_expected']} and the counter agrees; not a rolled-back set"
        )
    if doc["counter_expected"] is not None:
        return (
            "NOT checked: this set's job used a freshness counter; pass --counter (as given to "
            "'plinius train') to check it; until then a rolled-back set would pass every check"
        )
    return "NOT checkable: written without a freshness counter (a rolled-back set is not detected)"


def _ls_row(path: Path, kind: str, key: MasterKey | None) -> dict[str, Any]:
    """One file of ``plinius ls`` (or a mirror set): what can be read of it (an ``error`` when
    nothing more)."""
    row: dict[str, Any] = {
        "name": path.name,
        "path": str(path),
        "kind": kind,
        "size": None,
        "modified_at": None,
        "generation": None,
        "step": None,
        "model": None,
        "total_steps": None,
        "dataset_id": None,
        "records": None,
        "authenticated": False,
        "error": None,
    }
    try:
        if kind == "mirror-set":
            _ls_set(row, path, key)
            return row
        st = path.stat()
        row.update(size=st.st_size, modified_at=st.st_mtime)
        if kind == "mirror":
            from ..mirror import Mirror, describe_file

            row["generation"] = describe_file(path).generation
            if key is not None:
                # Read-only, under the shared lock: a running job's file says "in use".
                with Mirror(path, key, readonly=True) as m:
                    _ls_read(row, m)
        else:
            from ..data import describe_dataset

            d = describe_dataset(path, key, verify=False)  # the header only: ls stays fast
            row.update(
                dataset_id=d["dataset_id"], records=d["records"], authenticated=d["authenticated"]
            )
    except PliniusError as exc:
        row["error"] = str(exc)
    except OSError as exc:
        row["error"] = str(storage_error(exc, f"cannot read {path}"))
    return row


def _ls_set(row: dict[str, Any], path: Path, key: MasterKey | None) -> None:
    """A mirror set's row: its files' total size, local-0's generation, the global step."""
    from ..dist import SetView, member_files
    from ..mirror import describe_file

    files = member_files(path)
    stats = [f.stat() for _, f in files]
    row.update(
        size=sum(st.st_size for st in stats),
        modified_at=max(st.st_mtime for st in stats),
        generation=describe_file(files[0][1]).generation,
    )
    if key is not None:
        with SetView(path, key) as view:
            _ls_read(row, view)


def _ls_read(row: dict[str, Any], m: Mirror | SetView) -> None:
    """What the key shows of a mirror (or a set) in its ``ls`` row: step and job."""
    info, job = m.info(), job_of(m)
    row.update(
        generation=info.generation,
        step=info.step,
        model=job["model"],
        total_steps=job["total_steps"],
        dataset_id=job["dataset_id"],
        authenticated=True,
    )


def _ls_detail(row: dict[str, Any]) -> str:
    if row["error"] is not None:
        return f"unreadable: {row['error']}"
    if row["kind"] == "dataset":
        return f"{row['records']} records, dataset id {row['dataset_id']}"
    if not row["authenticated"]:
        return "-"
    if row["model"] is None:
        return "(no job recorded: not written by plinius train)"
    return job_text(row)


def _ls_table(rows: list[dict[str, Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    table = [["KIND", "STEP", "GEN", "SIZE", "MODIFIED", "NAME", "JOB / DATA"]]
    for r in rows:
        step = cell(r["step"])
        if r["kind"] == "mirror" and not r["authenticated"] and r["error"] is None:
            step = "?"
        size = _size(r["size"]) if r["size"] is not None else "-"
        when = _when(r["modified_at"]) if r["modified_at"] is not None else "-"
        table.append([r["kind"], step, cell(r["generation"]), size, when, r["name"], _ls_detail(r)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in table
    ]


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Master key file: read each mirror's step and job (its manifest is encrypted).",
)
@json_option
def ls(directory: Path, key_path: Path | None, as_json: bool) -> None:
    """List the mirrors and sealed datasets in DIRECTORY.

    Per file: kind, step, committed generation, size, modification time, and
    the mirror's job (model, steps, dataset) or the dataset's records and id.
    A mirror's step and job are in its encrypted manifest: they need --key.
    Other files are skipped; a file that cannot be read says why.
    """
    from ..crypto import MasterKey

    key = MasterKey.load(key_path) if key_path is not None else None
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise storage_error(exc, f"cannot list {directory}") from exc
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for e in entries:
        path = Path(e.path)
        try:
            # Symbolic links, directories, FIFOs and devices are never opened.
            kind = sniff(path) if e.is_file(follow_symlinks=False) else None
        except OSError as exc:
            row = _ls_row(path, "mirror", None)  # named for what it is not known to be
            row.update(kind=None, error=str(storage_error(exc, f"cannot read {path}")))
            rows.append(row)
            continue
        if kind in ("mirror", "dataset"):
            rows.append(_ls_row(path, kind, key))
        elif e.is_dir(follow_symlinks=False) and any(path.glob("local-*.plm")):
            rows.append(_ls_row(path, "mirror-set", key))  # a torchrun job's mirror set
        else:
            skipped.append(e.name)
    if as_json:
        echo_json(
            {
                "directory": str(directory),
                "key_given": key is not None,
                "files": rows,
                "skipped": skipped,
            }
        )
        return
    if rows:
        for line in _ls_table(rows):
            click.echo(line.rstrip())
    mirrors = sum(r["kind"] == "mirror" for r in rows)
    sets = sum(r["kind"] == "mirror-set" for r in rows)
    datasets = sum(r["kind"] == "dataset" for r in rows)
    summary = f"{directory}: {mirrors} mirror(s), {datasets} sealed dataset(s)"
    if sets:
        summary += f", {sets} mirror set(s)"
    if skipped:
        summary += f"; {len(skipped)} other file(s) skipped"
    click.echo(summary)
    if key is None and mirrors:
        click.echo("a mirror's step and job are encrypted: pass --key KEY to read them")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def rm(paths: tuple[Path, ...]) -> None:
    """Remove mirror and sealed dataset files, and nothing else.

    A mirror set (the directory of a multi-process job) is removed whole: its
    process files, then the directory. Refuses, removing nothing, when any PATH
    is not a plinius mirror, mirror set or sealed dataset (a key, a symbolic
    link, any other file, a directory holding anything else) or is a mirror
    that a running job (or reader) has open. Each removal is made durable (the
    directory is synced).
    """
    from ..mirror import exclusive_lock

    targets: list[tuple[Path, FileKind, int]] = []
    seen: set[tuple[int, int]] = set()
    files, sets = _expand_sets(paths)
    for p in files:
        try:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                raise ConfigError(f"{p} is a symbolic link; give the file itself (nothing removed)")
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(
                    f"{p} is not a regular file; plinius rm removes mirrors and sealed "
                    "datasets only (nothing removed)"
                )
            kind = sniff(p)
        except OSError as exc:
            raise storage_error(exc, f"cannot remove {p} (nothing removed)") from exc
        if kind not in ("mirror", "dataset"):
            what = "a sealed master key" if kind == "sealed-key" else "not a plinius file"
            raise ConfigError(
                f"{p} is {what}; plinius rm removes mirrors and sealed datasets only "
                "(nothing removed)"
            )
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            targets.append((p, kind, st.st_size))
    with contextlib.ExitStack() as locks:
        # Every mirror's writer lock first, all held until the end: a running
        # job refuses the whole command, and none can open a file meanwhile.
        for p, kind, _ in targets:
            if kind == "mirror":
                try:
                    locks.enter_context(exclusive_lock(p))
                except StorageError as exc:
                    raise StorageError(
                        f"{p} is in use by another process (a running job or reader holds its "
                        "lock); stop it first (nothing removed)"
                    ) from exc
        for p, kind, size in targets:
            try:
                os.unlink(p)
                fsync_dir(p.parent)
            except OSError as exc:
                raise storage_error(exc, f"cannot remove {p}") from exc
            click.echo(f"removed {p} ({kind}, {_size(size)})")
        for d in sets:
            try:
                d.rmdir()
                fsync_dir(d.parent)
            except OSError as exc:
                raise storage_error(exc, f"cannot remove the directory {d}") from exc
            click.echo(f"removed {d} (mirror set)")


def _expand_sets(paths: tuple[Path, ...]) -> tuple[list[Path], list[Path]]:
    """The files ``rm`` removes (a mirror set's process files in its place) and the sets."""
    from ..dist import member_files

    files: list[Path] = []
    sets: list[Path] = []
    for p in paths:
        if not p.is_dir() or p.is_symlink():
            files.append(p)
            continue
        try:
            members = [f for _, f in member_files(p)]
        except FormatError as exc:
            raise ConfigError(
                f"{p} is not a regular file nor a mirror set; plinius rm removes mirrors, "
                "mirror sets and sealed datasets only (nothing removed)"
            ) from exc
        others = sorted(q.name for q in p.iterdir() if q not in members)
        if others:
            raise ConfigError(
                f"{p} holds other files than a mirror set's ({', '.join(others[:3])}); "
                "plinius rm removes mirrors and sealed datasets only (nothing removed)"
            )
        files += members
        sets.append(p)
    return files, sets


@click.command()
@click.argument("mirror", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Master key file.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The .safetensors file to write (never overwritten).",
)
@counter_option(READ_COUNTER_HELP)
@_key_server_options
def export(
    mirror: Path,
    key_path: Path,
    out: Path,
    counter_spec: str | None,
    key_server: str | None,
    key_server_pubkey: str | None,
    job_id: str | None,
) -> None:
    """Decrypt the model in MIRROR into a safetensors file (plaintext!).

    Writes the tensors of state["model"] (names without the "model." prefix),
    or every tensor if the state has no "model" entry.
    """
    from safetensors import SafetensorError

    from ..crypto import MasterKey
    from ..job import export_metadata, write_safetensors

    source = CounterSource(counter_spec, key_server, key_server_pubkey, job_id)
    check_distinct_paths(
        {
            "MIRROR": mirror,
            "--key": key_path,
            "--out": out,
            "--counter file:": counter_file(counter_spec),
        }
    )
    if out.exists():
        raise StorageError(f"{out} already exists; refusing to overwrite it")
    key = MasterKey.load(key_path)
    with source.open(mirror, key) as m:
        info = m.info()
        if info.generation == 0:
            raise ConfigError(f"{mirror} holds no saved state yet; nothing to export")
        names = m.committed_state_names()
        has_model = any(n.startswith("model.") for n in names)
        tensors = m.read_tensors("model." if has_model else "")
        try:
            job = m.committed_value("job")
        except ConfigError:  # a library user's state with tensors under "job"
            job = None
    if has_model:
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    metadata, cfg_note = export_metadata(info.step, info.generation, job)
    d = out.parent if str(out.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=d)
    except OSError as exc:
        raise storage_error(exc, f"cannot create a file in {d}") from exc
    os.close(fd)
    try:
        try:
            write_safetensors(tensors, metadata, Path(tmp))
        except SafetensorError as exc:  # raised for I/O errors: a full disk, say
            raise StorageError(
                f"cannot write {out}: {exc}; free some space or choose another directory"
            ) from exc
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"safetensors cannot store this state: {exc}") from exc
        except OSError as exc:
            raise storage_error(exc, f"cannot write {out}") from exc
        try:
            os.link(tmp, out)  # atomic and exclusive: never overwrites
        except FileExistsError as exc:
            raise StorageError(f"{out} already exists; refusing to overwrite it") from exc
        except OSError as exc:
            raise storage_error(exc, f"cannot write {out}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if counter_spec is None:
        click.echo(unchecked_note(info), err=True)
    click.echo(f"wrote {len(tensors)} tensors ({_size(total)}) of step {info.step} to {out}")
    if cfg_note:
        click.echo(f"note: {cfg_note}", err=True)
    click.echo("note: the exported file is plaintext; protect it like the model itself")
