"""``plinius bench``: the benchmark suite in one command."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..errors import ConfigError


def register(group: click.Group) -> None:
    """Add the benchmark command to ``group``."""
    group.add_command(bench)


# plinius.bench.SECTIONS, repeated so that building the help does not import the bench package.
_SECTIONS = ("latency", "overhead", "sealed", "recovery", "memory", "ddp", "dcp", "replicas")


@click.command()
@click.option("--quick", is_flag=True, help="Fewer sizes and repetitions: under 2 minutes.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-out"),
    show_default=True,
    help="Where results.json, results.md and the plots go.",
)
@click.option(
    "--pm-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/dev/shm"),
    show_default=True,
    help="Persistent-memory directory (tmpfs = emulated PM; a DAX mount = real PM).",
)
@click.option(
    "--disk-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for the disk checkpoints (default: the working directory).",
)
@click.option(
    "--sizes",
    default=None,
    help="Latency sizes, comma-separated: MB of parameters (SGD), or MB:adam for a state "
    "of that size with Adam; e.g. '10,100,300:adam'.",
)
@click.option(
    "--only",
    default=None,
    help=f"Sections to run, comma-separated, from: {', '.join(_SECTIONS)} (default: all).",
)
@click.option(
    "--repeats",
    default=None,
    type=click.IntRange(min=1, max=100),
    help="Repetitions per measurement (default: 5, quick: 3).",
)
@click.option(
    "--threads", default=None, type=click.IntRange(min=1), help="torch threads (default: torch's)."
)
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars (default: in a terminal; elsewhere a plain line every 5 s).",
)
def bench(
    quick: bool,
    out: Path,
    pm_dir: Path,
    disk_dir: Path | None,
    sizes: str | None,
    only: str | None,
    repeats: int | None,
    threads: int | None,
    no_plots: bool,
    progress: bool | None,
) -> None:
    """Measure plinius against the alternatives and write a report into OUT.

    Save/restore latency versus size (against an encrypted disk checkpoint,
    torch.save, torch.distributed.checkpoint and raw AES-GCM), mirroring
    overhead per iteration, sealed-data overhead, recovery time after SIGKILL
    and peak memory. Every file made in the PM and disk directories is removed.
    """
    from ..bench import BenchConfig, parse_sizes, run_bench
    from ..bench.report import PLOTS_MISSING, plots_available

    disk = disk_dir if disk_dir is not None else Path.cwd()
    for label, d in (("--pm-dir", pm_dir), ("--disk-dir", disk)):
        if not d.is_dir():
            raise ConfigError(
                f"{label} {d} is not an existing directory; create it or pick another"
            )
    sections: tuple[str, ...] = _SECTIONS
    if only is not None:
        picked = tuple(s.strip().lower() for s in only.split(",") if s.strip())
        bad = [s for s in picked if s not in _SECTIONS]
        if bad or not picked:
            raise ConfigError(
                f"--only: unknown section(s) {', '.join(bad) or '(none given)'}; "
                f"choose from {', '.join(_SECTIONS)}"
            )
        sections = picked
    if sizes is not None and "latency" not in sections:
        raise click.UsageError("--sizes applies to the latency section; add latency to --only")
    cfg = BenchConfig.preset(
        quick,
        out=out,
        pm_dir=pm_dir,
        disk_dir=disk,
        command=shlex.join(["plinius", "bench", *sys.argv[2:]]),
    )
    cfg.sections = sections
    if sizes is not None:
        cfg.sizes = parse_sizes(sizes)
    if repeats is not None:
        cfg.repeats = repeats
    cfg.threads = threads
    # Without matplotlib (a bare install) everything but the PNGs still runs.
    missing_plots = not no_plots and not plots_available()
    cfg.plots = not no_plots and not missing_plots
    # Outside a terminal (CI, nohup, a pipe) a plain line every few seconds, not silence.
    show: bool | str = progress if progress is not None else sys.stderr.isatty() or "plain"
    results = run_bench(cfg, progress=show)
    click.echo(f"wrote {results['files']['markdown']} and {results['files']['json']}")
    for p in results["plots"]:
        click.echo(f"wrote {p}")
    if missing_plots:
        click.echo(f"plots skipped: {PLOTS_MISSING}")
    for k in results["meta"]["skipped"]:
        click.echo(f"skipped {k['section']} {k['size']}: {k['reason']}")
