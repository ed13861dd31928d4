"""``plinius keygen``: create a master key file."""

from __future__ import annotations

from pathlib import Path

import click


def register(group: click.Group) -> None:
    """Add the key commands to ``group``."""
    group.add_command(keygen)


@click.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def keygen(out: Path) -> None:
    """Write a new random master key to OUT (mode 0600; never overwrites)."""
    from ..crypto import MasterKey

    key = MasterKey.generate()
    key.save(out)
    click.echo(f"wrote {out} (fingerprint {key.fingerprint.hex()})")
    click.echo("keep it secret: whoever has this file can decrypt the data and models")
