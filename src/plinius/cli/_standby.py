"""``plinius train --standby``: the command's side of a standby pair (see :mod:`plinius.standby`).

The command runs as the supervisor when ``--standby`` is given and
:data:`plinius.standby.ENV` is not set; the supervisor starts workers that
run the same command line (rebuilt from the parsed options) with the
variable set, and each worker stops at :func:`take_turn` before it opens the
mirror.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..job import EventLog
from ..standby import ENV, Turn, gate, refuse_torchrun, supervise, warm_up


def is_worker() -> bool:
    """Whether this process is a worker of a standby pair (not its supervisor)."""
    import os

    return bool(os.environ.get(ENV))


def worker_command(ctx: click.Context) -> list[str]:
    """The argv of a worker: this command with the options given on its command line.

    Defaults and options read from the environment reach the worker as they
    are (it inherits the environment), so only command-line options are repeated.
    """
    argv = [sys.executable, "-m", "plinius", ctx.info_name or "train"]
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name is None:
            continue
        if ctx.get_parameter_source(p.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[p.name]
        if p.is_flag:
            if value:
                argv.append(p.opts[0])
            elif p.secondary_opts:
                argv.append(p.secondary_opts[0])
        elif value is not None:
            argv += [p.opts[0], str(value)]  # str(float) is exact: it round-trips
    return argv


def supervise_train(ctx: click.Context, events_path: Path | None) -> None:
    """Run this ``plinius train`` command as a standby pair, then exit with its status.

    Raises:
        ConfigError: Under torchrun, or without pidfds.
    """
    refuse_torchrun()
    code = supervise(
        worker_command(ctx),
        events=events_path,
        say=lambda line: click.echo(line, err=line.startswith("error: ")),
    )
    ctx.exit(code)


def take_turn(mirror_path: Path, spec: Any, ds: Any, batch_size: int) -> Turn | None:
    """The gate of a ``plinius train`` worker, with a warm-up step of the job's model."""

    def warmup() -> None:
        n = min(batch_size, len(ds))
        batch = ds.get_batch(list(range(n)))
        warm_up(spec.module, batch, spec.loss, spec.prepare, spec.split)

    return gate(mirror_path, warmup=warmup)


def report_takeover(turn: Turn | None, events: EventLog, resumed: int | None) -> None:
    """After the restore: a ``takeover`` event and a line, for a worker that replaced a trainer."""
    if turn is None or not turn.took_over:
        return
    fields = turn.event_fields(resumed)
    events.write("takeover", **fields)
    after = "an empty mirror" if resumed is None else f"step {resumed}"
    click.echo(
        f"took over after {after}: the previous training process (pid {turn.previous_pid}) "
        f"died ({turn.cause}) {fields['since_death_s'] * 1e3:.0f} ms ago"
    )
