"""``plinius seal``: seal a training set under the data owner's key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import StorageError
from ._json import echo_json, json_option
from ._paths import check_distinct_paths

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..crypto import MasterKey

# Below this much plaintext, sealing takes well under a second: no progress bar.
_PROGRESS_BYTES = 16 * 1024 * 1024


def register(group: click.Group) -> None:
    """Add the data commands to ``group``."""
    group.add_command(seal)


_FILE = click.Path(path_type=Path, dir_okay=False)


@click.command()
@click.option(
    "--key", "key_path", required=True, type=_FILE, help="The data owner's master key file."
)
@click.option(
    "--out", "out", required=True, type=_FILE, help="The sealed dataset file to write (.pld)."
)
@click.option(
    "--builtin",
    type=click.Choice(["digits"]),
    help="A bundled dataset: 'digits' is scikit-learn's 8x8 handwritten digits (offline).",
)
@click.option("--npz", type=_FILE, help="An .npz archive: every array becomes a field, in order.")
@click.option("--idx-images", type=_FILE, help="An IDX image file (MNIST format), plain or .gz.")
@click.option("--idx-labels", type=_FILE, help="The matching IDX label file, plain or .gz.")
@click.option(
    "--csv", "csv_path", type=_FILE, help="A CSV file with a header row (needs --label-column)."
)
@click.option("--label-column", help="The CSV column holding integer class labels.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--chunk-records",
    type=click.IntRange(min=1),
    default=None,
    help="Records per encrypted chunk (default: about 256 KiB; ~16 KiB suits a full shuffle).",
)
@json_option
def seal(
    key_path: Path,
    out: Path,
    builtin: str | None,
    npz: Path | None,
    idx_images: Path | None,
    idx_labels: Path | None,
    csv_path: Path | None,
    label_column: str | None,
    overwrite: bool,
    chunk_records: int | None,
    as_json: bool,
) -> None:
    """Seal a training set into OUT, encrypted and authenticated under KEY.

    Give exactly one source: --builtin digits, --npz FILE, --idx-images FILE
    --idx-labels FILE, or --csv FILE --label-column NAME. The first field is
    the model input and the last the label. Prints the dataset id, which
    'plinius train --dataset-id' can require.
    """
    sources = [
        name
        for name, given in (
            ("--builtin", builtin),
            ("--npz", npz),
            ("--idx-images/--idx-labels", idx_images or idx_labels),
            ("--csv", csv_path),
        )
        if given
    ]
    if len(sources) != 1:
        raise click.UsageError(
            "give exactly one source: --builtin, --npz, --idx-images with --idx-labels, "
            "or --csv with --label-column" + (f" (got {', '.join(sources)})" if sources else "")
        )
    if (idx_images is None) != (idx_labels is None):
        raise click.UsageError("--idx-images and --idx-labels go together")
    if (csv_path is None) != (label_column is None):
        raise click.UsageError("--csv and --label-column go together")

    # --overwrite must never replace an input: sealing over the key file would
    # lose the only key that opens the data.
    check_distinct_paths(
        {
            "--key": key_path,
            "--out": out,
            "--npz": npz,
            "--idx-images": idx_images,
            "--idx-labels": idx_labels,
            "--csv": csv_path,
        }
    )

    from ..crypto import MasterKey
    from ..data import sources as readers

    # Fail fast, before a possibly long load of the input.
    if out.exists() and not overwrite:
        raise StorageError(f"{out} already exists; choose another path or pass --overwrite")
    if not out.parent.is_dir():
        raise StorageError(
            f"cannot create {out}: directory {out.parent} does not exist; create it first"
        )
    key = MasterKey.load(key_path)

    if builtin is not None:
        fields = readers.load_builtin(builtin)
    elif npz is not None:
        fields = readers.load_npz(npz)
    elif idx_images is not None and idx_labels is not None:
        fields = readers.load_idx(idx_images, idx_labels)
    else:
        assert csv_path is not None and label_column is not None
        fields = readers.load_csv(csv_path, label_column)

    total_bytes = sum(int(a.nbytes) for a in fields.values())
    dataset_id = _seal_with_progress(out, key, fields, chunk_records, overwrite, total_bytes)

    records = len(next(iter(fields.values())))
    if as_json:
        doc = {
            "path": str(out),
            "records": records,
            "dataset_id": dataset_id,
            "fields": [
                {"name": name, "dtype": str(arr.dtype), "shape": [int(d) for d in arr.shape[1:]]}
                for name, arr in fields.items()
            ],
            "key_fingerprint": key.fingerprint.hex(),
        }
        echo_json(doc)
        return
    click.echo(f"sealed {records} records into {out}")
    click.echo(f"dataset id: {dataset_id}")
    for name, arr in fields.items():
        click.echo(f"  field {name}: {arr.dtype} {tuple(arr.shape[1:])}")
    click.echo(f"key fingerprint: {key.fingerprint.hex()}")


def _seal_with_progress(
    out: Path,
    key: MasterKey,
    fields: Mapping[str, np.ndarray[Any, Any]],
    chunk_records: int | None,
    overwrite: bool,
    total_bytes: int,
) -> str:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from ..data import seal_dataset

    with Progress(
        TextColumn("sealing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("records"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=total_bytes < _PROGRESS_BYTES,
    ) as bar:
        task = bar.add_task("seal", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return seal_dataset(
            out, key, fields, chunk_records=chunk_records, overwrite=overwrite, progress=progress
        )
