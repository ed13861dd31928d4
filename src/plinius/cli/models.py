"""``plinius models``: list the built-in models, or show a Darknet cfg's layers."""

from __future__ import annotations

from pathlib import Path

import click


def register(group: click.Group) -> None:
    """Add the model commands to ``group``."""
    group.add_command(models)


def _hw_c(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return f"{h:4d} x{w:4d} x{c:5d}"


@click.command()
@click.option(
    "--cfg",
    "cfg",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A Darknet .cfg file: print its layers, output shapes and parameter count.",
)
@click.option(
    "--input",
    "input_spec",
    metavar="HxWxC",
    help="The input size for --cfg instead of [net]'s height/width/channels, e.g. 8x8x1.",
)
def models(cfg: Path | None, input_spec: str | None) -> None:
    """List the built-in models, or load a Darknet cfg and print its layers.

    A model is given to `plinius train --model` by built-in name or as the path
    of a .cfg file. Sizes are MB (10^6 bytes) of float32 parameters, for 28x28
    single-channel inputs and 10 classes.
    """
    from ..errors import ConfigError

    if cfg is None:
        if input_spec is not None:
            raise ConfigError("--input applies to --cfg; give the cfg file too")
        _list_builtins()
    else:
        _show_cfg(cfg, input_spec)


def _list_builtins() -> None:
    from rich.console import Console
    from rich.table import Table

    from ..models import list_models, shipped_cfgs

    table = Table(title="built-in models", title_justify="left")
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("params MB", justify="right", no_wrap=True)
    table.add_column("description")
    for entry in list_models():
        table.add_row(entry.name, f"{entry.param_mb:.2f}", entry.description)
    console = Console()
    console.print(table)
    console.print("or a Darknet .cfg file (plinius models --cfg FILE shows its layers); shipped:")
    for cfg in shipped_cfgs():
        console.print(f"  {cfg}", highlight=False, soft_wrap=True)


def _show_cfg(path: Path, input_spec: str | None) -> None:
    import torch

    from ..darknet import load_cfg, parse_input_spec

    shape = parse_input_spec(input_spec) if input_spec is not None else None
    # The meta device gives shapes and parameter counts without allocating.
    with torch.device("meta"):
        model = load_cfg(path, shape, resize=True)
    c, h, w = model.input_shape
    click.echo(f"{path.name}: {len(model.layers)} layers, input {h} x {w} x {c}")
    click.echo(f"{'layer':>5}  {'type':<13} {'settings':<22} {'input':>17}  ->  "
               f"{'output':>17} {'params':>11}")  # fmt: skip
    for layer in model.layers:
        click.echo(
            f"{layer.index:5d}  {layer.kind:<13} {layer.detail:<22} {_hw_c(layer.in_shape)}  ->  "
            f"{_hw_c(layer.out_shape)} {layer.params:11,d}"
        )
    params = model.param_count()
    click.echo(f"parameters: {params:,d} ({params * 4 / 1e6:.3f} MB float32); outputs "
               f"{model.outputs} per record; head: {model.head}")  # fmt: skip
    net = model.net
    click.echo(
        f"[net]: batch {net.batch} (subdivisions {net.subdivisions}), learning_rate "
        f"{net.learning_rate:g}, momentum {net.momentum:g}, decay {net.decay:g}, "
        f"policy {net.policy.describe()}"
    )
    if net.ignored:
        click.echo(
            f"ignored: {', '.join(net.ignored)} (Darknet's image augmentation; plinius "
            "trains on records, as the original Plinius did)"
        )
