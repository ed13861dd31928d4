"""``plinius inspect`` (mirror or sealed dataset) and ``plinius export`` (mirror to safetensors)."""

from __future__ import annotations

import datetime as _dt
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .._magic import FileKind, sniff
from ..errors import ConfigError, FormatError, StorageError, storage_error
from ._freshness import (
    READ_COUNTER_HELP,
    counter_option,
    freshness_line,
    open_for_reading,
    unchecked_note,
)
from ._paths import check_distinct_paths, counter_file

if TYPE_CHECKING:  # pragma: no cover
    from ..crypto import MasterKey
    from ..mirror import Mirror


def register(group: click.Group) -> None:
    """Add the mirror commands to ``group``."""
    group.add_command(inspect)
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

    def open(self, path: Path, key: MasterKey) -> Mirror:
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
    from ..crypto import MasterKey

    source = counter or CounterSource(None, None, None, None)
    key = MasterKey.load(key_path)
    with source.open(path, key) as m:
        info = m.verify()
        tensors = m.committed_tensors()
    lines += [
        f"  step             {info.step if info.step is not None else 'none (never saved)'}",
        f"  saved            {_when(info.saved_at)}",
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
        f"  freshness        {freshness_line(info, source.spec)}",
    ]
    return lines


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Master key file: decrypt the manifest and verify every tag.",
)
@counter_option(READ_COUNTER_HELP + " Needs --key.")
@_key_server_options
def inspect(
    path: Path,
    key_path: Path | None,
    counter_spec: str | None,
    key_server: str | None,
    key_server_pubkey: str | None,
    job_id: str | None,
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
        lines = inspect_dataset(path, key)
    elif kind == "mirror":
        lines = mirror_lines(path, key_path, source)
    else:
        raise FormatError(
            f"{path} is neither a plinius mirror nor a sealed dataset (unknown header)"
        )
    for line in lines:
        click.echo(line)


@click.command()
@click.argument("mirror", type=click.Path(exists=True, dir_okay=False, path_type=Path))
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
            job = m.read_plain("job")
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
