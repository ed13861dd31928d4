"""``plinius demo`` and ``plinius crash-test``."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import click

from ..errors import ConfigError
from ._paths import check_distinct_paths, job_paths
from .train import data_option, mirror_option


def register(group: click.Group) -> None:
    """Add the demo and crash-campaign commands to ``group``."""
    group.add_command(demo)
    group.add_command(crash_test)


def _speedup(baseline_ms: float, plinius_ms: float) -> str:
    """'N.Nx faster' (or slower) of plinius against the baseline."""
    r = baseline_ms / max(plinius_ms, 1e-9)
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def _lost(ms: list[float]) -> str:
    """Median and worst of the times lost to kills (kill to the end of the next step, less one)."""
    import statistics

    def fmt(x: float) -> str:
        return f"{x:.0f} ms" if x < 1000 else f"{x / 1e3:.2f} s"

    return f"median {fmt(statistics.median(ms))}, worst {fmt(max(ms))} ({len(ms)} kills)"


def _yes(ok: bool) -> str:
    return "[green]yes[/green]" if ok else "[bold red]NO[/bold red]"


@click.command()
@click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), help="Keep outputs here."
)
@click.option(
    "--pm-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Persistent-memory directory (default /dev/shm).",
)
@click.option(
    "--crashes",
    default=2,
    show_default=True,
    type=click.IntRange(min=0, max=50),
    help="SIGKILLs during the crashed run.",
)
@click.option(
    "--steps",
    default=2500,
    show_default=True,
    type=click.IntRange(min=10),
    help="Steps of the job (with the standby: enough for a spare to get ready before each kill).",
)
@click.option(
    "--standby/--cold",
    default=True,
    show_default=True,
    help="Crash a standby pair (a warm spare takes over; a cold restart is timed beside it), "
    "or restart cold after each kill.",
)
@click.option("--model", default="cnn-tiny", show_default=True, help="Built-in model or .cfg path.")
@click.option(
    "--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Batch size."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of training and kills.")
@click.option(
    "--nproc",
    default=None,
    type=int,
    help="Train in N processes under torchrun and kill random workers (default: one process).",
)
def demo(
    workdir: Path | None,
    pm_dir: Path | None,
    crashes: int,
    steps: int,
    model: str,
    batch_size: int,
    seed: int,
    nproc: int | None,
    standby: bool,
) -> None:
    """Train with random SIGKILLs, resume each time, and prove the result is exact.

    Generates a key, seals the built-in digits dataset into persistent memory,
    trains the reference CNN while killing it, trains the same job without
    interruption, and reports recovery times, mirror vs encrypted-SSD timings,
    accuracy and whether both final models are bit-for-bit identical.
    """
    from rich.console import Console
    from rich.table import Table

    from ..bench.demo import DemoConfig, run_demo

    if nproc is not None:
        from ..bench.multiproc import check_nproc

        check_nproc(nproc, batch_size)  # before the work directory is made
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    if pm_dir is not None and not pm_dir.is_dir():
        raise ConfigError(f"--pm-dir {pm_dir} is not a directory")
    console = Console(highlight=False)
    cfg = DemoConfig(
        workdir=workdir or Path(tempfile.mkdtemp(prefix="plinius-demo-")),
        pm_dir=pm_dir,
        crashes=crashes,
        steps=steps,
        model=model,
        batch_size=batch_size,
        seed=seed,
        nproc=nproc,
        standby=standby and nproc is None,
    )
    # markup=False: the lines are plain text ("pip install 'plinius[plots]'" included).
    rep = run_demo(cfg, log=lambda s: console.print(s, markup=False))
    t = Table(title="plinius demo", show_header=False)
    t.add_row("crashes (SIGKILL)", str(rep.crashes))
    for r in rep.resumes:
        if r["resumed_from"] is not None:
            start = r["start_to_first_step_s"]
            t.add_row(
                f"  resume of run {r['run']}",
                f"after step {r['resumed_from']}: "
                + (
                    f"restore {r['restore_ms']:.1f} ms, process start to first step {start:.2f} s"
                    if start is not None
                    else f"a warm spare took over, restored {r['restore_ms']:.1f} ms after the kill"
                ),
            )
    if rep.lost_standby_ms:
        t.add_row("time lost to a SIGKILL: standby", _lost(rep.lost_standby_ms))
    if rep.lost_cold_ms:
        t.add_row("time lost to a SIGKILL: cold restart", _lost(rep.lost_cold_ms))
    t.add_row("persistent memory", rep.pm_kind)
    t.add_row("state size", f"{rep.state_bytes / 1e6:.2f} MB")
    t.add_row(
        "save: mirror vs encrypted SSD checkpoint",
        f"{rep.mirror_save_ms:.2f} ms vs {rep.ssd_save_ms:.2f} ms "
        f"({_speedup(rep.ssd_save_ms, rep.mirror_save_ms)})",
    )
    t.add_row(
        "restore: mirror vs encrypted SSD checkpoint",
        f"{rep.mirror_restore_ms:.2f} ms vs {rep.ssd_restore_ms:.2f} ms "
        f"({_speedup(rep.ssd_restore_ms, rep.mirror_restore_ms)})",
    )
    if rep.reference is not None:
        ref = rep.reference
        t.add_row(
            f"same for the reference CNN ({ref['state_bytes'] / 1e6:.0f} MB state): save",
            f"{ref['mirror_save_ms']:.1f} ms vs {ref['ssd_save_ms']:.1f} ms "
            f"({_speedup(ref['ssd_save_ms'], ref['mirror_save_ms'])})",
        )
        t.add_row(
            "  restore",
            f"{ref['mirror_restore_ms']:.1f} ms vs {ref['ssd_restore_ms']:.1f} ms "
            f"({_speedup(ref['ssd_restore_ms'], ref['mirror_restore_ms'])})",
        )
    t.add_row(
        "test accuracy (crashed / uninterrupted)",
        f"{rep.accuracy_crashed * 100:.2f}% / {rep.accuracy_clean * 100:.2f}%",
    )
    t.add_row("losses bit-for-bit identical", _yes(rep.losses_identical))
    t.add_row("final state bit-for-bit identical", _yes(rep.identical))
    if rep.plot:
        t.add_row("loss curve", rep.plot)
    t.add_row("report", os.path.join(rep.workdir, "report.json"))
    t.add_row("wall time", f"{rep.wall_s:.1f} s")
    console.print(t)
    if not rep.identical:
        raise ConfigError(
            "the resumed run differs from the uninterrupted one in: "
            + ", ".join(rep.differences[:5])
        )


@click.command("crash-test")
@click.option(
    "--key", "key_path", required=True, type=click.Path(path_type=Path), help="Master key file."
)
@data_option
@mirror_option("Mirror file for the campaign.")
@click.option(
    "--model", "model_name", default="cnn-tiny", show_default=True, help="Model name or .cfg."
)
@click.option(
    "--steps", default=200, show_default=True, type=click.IntRange(min=1), help="Steps of the job."
)
@click.option(
    "--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Batch size."
)
@click.option(
    "--crashes",
    default=5,
    show_default=True,
    type=click.IntRange(min=0),
    help="SIGKILLs (at most).",
)
@click.option(
    "--schedule",
    type=click.Choice(["random", "trace"]),
    default="random",
    show_default=True,
    help="When to kill: random moments, or a spot-price trace.",
)
@click.option(
    "--trace",
    "trace_path",
    type=click.Path(path_type=Path),
    help="Spot-price CSV (seconds,price); synthetic if omitted.",
)
@click.option(
    "--bid",
    default=1.2,
    show_default=True,
    type=float,
    help="Killed while the price is above this.",
)
@click.option(
    "--time-scale",
    default=0.05,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Wall seconds per trace second.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Training seed and kill schedule seed."
)
@click.option(
    "--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch threads."
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Compare with an uninterrupted run.",
)
@click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), help="Logs and events go here."
)
@click.option(
    "--nproc",
    default=None,
    type=int,
    help="Train in N processes under torchrun and kill random workers (default: one process).",
)
@click.option(
    "--standby",
    is_flag=True,
    help="Train as a standby pair and kill the trainer each time a spare is ready; "
    "report the time each kill cost.",
)
def crash_test(
    key_path: Path,
    data_path: Path,
    mirror_path: Path,
    model_name: str,
    steps: int,
    batch_size: int,
    crashes: int,
    schedule: str,
    trace_path: Path | None,
    bid: float,
    time_scale: float,
    seed: int,
    threads: int,
    verify: bool,
    workdir: Path | None,
    nproc: int | None,
    standby: bool,
) -> None:
    """Kill `plinius train` with SIGKILL CRASHES times, resume each time, check the result.

    The schedule is random (random moments while training, some during start-up
    and restore) or the replay of a spot-price trace, as preemptible cloud
    instances are killed whenever the price rises above the bid. With --nproc N
    the job runs in N processes under torchrun (--mirror is then a mirror set,
    a directory), each kill hits one worker, and torchrun restarts the group.
    """
    from ..bench.crashtest import PriceTrace, mirror_differences, run_campaign, synthetic_trace
    from ..crypto import MasterKey

    if nproc is not None:
        if standby:
            raise click.UsageError("--standby cannot run under torchrun (--nproc); drop one")
        _check_nproc_options(nproc, batch_size, schedule)
    if schedule != "trace":
        ctx = click.get_current_context()
        stray = [
            f"--{n.replace('_', '-')}"
            for n in ("trace_path", "bid", "time_scale")
            if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE
        ]
        if stray:
            flags = ", ".join(s.replace("--trace-path", "--trace") for s in stray)
            raise click.UsageError(
                f"{flags} {'needs' if len(stray) == 1 else 'need'} --schedule trace"
            )
    if standby and schedule == "trace":
        raise click.UsageError(
            "--standby cannot follow a price trace: a preempted instance takes its spare "
            "with it; use --schedule random"
        )
    if not math.isfinite(bid):
        raise click.BadParameter(f"{bid} is not a finite price", param_hint="--bid")
    # The campaign appends to these files in --workdir, and writes MIRROR.reference.
    written = {"events.jsonl", "train.log", "reference.events.jsonl", "reference.log"}
    check_distinct_paths(
        {
            **job_paths(key=key_path, data=data_path, mirror=mirror_path, model=model_name),
            "--mirror's .reference": mirror_path.with_name(mirror_path.name + ".reference"),
            "--trace": trace_path,
        },
        {"--workdir": (workdir, written.__contains__)},
    )
    key = MasterKey.load(key_path)
    if mirror_path.exists():
        raise ConfigError(f"{mirror_path} exists; a crash test starts from a new mirror file")
    ref = mirror_path.with_name(mirror_path.name + ".reference")
    if verify and ref.exists():  # the comparison run writes there and removes it after
        raise ConfigError(f"{ref} exists; remove it, or pass --no-verify")
    trace = None
    if schedule == "trace":
        trace = PriceTrace.load(trace_path) if trace_path else synthetic_trace(seed, 10_000, 40.0)
    wd = workdir or Path(tempfile.mkdtemp(prefix="plinius-crash-"))
    wd.mkdir(parents=True, exist_ok=True)
    base = [
        "--key", str(key_path), "--data", str(data_path), "--model", model_name,
        "--steps", str(steps), "--batch-size", str(batch_size), "--seed", str(seed),
        "--threads", str(threads),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONHASHSEED="0")

    seen: list[object] = []

    def on_run(r: object) -> None:
        from ..bench.crashtest import RunRecord, describe_run

        assert isinstance(r, RunRecord)
        prev = seen[-1] if seen else None
        click.echo(describe_run(r, prev if isinstance(prev, RunRecord) else None))
        seen.append(r)

    if nproc is not None:
        _crash_test_nproc(nproc, base, key, mirror_path, ref, wd, crashes, seed, steps, verify, env)
        return
    if standby:
        _standby_campaign(base, mirror_path, wd, crashes, seed, env)
    else:
        result = run_campaign(
            [*base, "--mirror", str(mirror_path)],
            events_path=wd / "events.jsonl",
            log_path=wd / "train.log",
            crashes=crashes,
            seed=seed,
            trace=trace,
            bid=bid,
            time_scale=time_scale,
            env=env,
            on_run=on_run,
            total_steps=steps,
        )
        click.echo(f"{result.crashes} crashes, job finished: {result.finished}; logs in {wd}")
    if verify:
        try:
            run_campaign(
                [*base, "--mirror", str(ref)],
                events_path=wd / "reference.events.jsonl",
                log_path=wd / "reference.log",
                crashes=0,
                env=env,
            )
            diffs = mirror_differences(mirror_path, ref, key)
        finally:
            ref.unlink(missing_ok=True)
        if diffs:
            raise ConfigError(
                "the resumed run differs from an uninterrupted run in: " + ", ".join(diffs[:5])
            )
        click.echo("bit-for-bit identical to an uninterrupted run: yes")


def _check_nproc_options(nproc: int, batch_size: int, schedule: str) -> None:
    """Refuse what a torchrun campaign cannot do, in one line, before anything starts."""
    from ..bench.multiproc import check_nproc

    check_nproc(nproc, batch_size)
    if schedule != "random":
        raise click.UsageError("--nproc runs the random schedule only; drop --schedule trace")


def _crash_test_nproc(
    nproc: int,
    base: list[str],
    key: object,
    mirror_path: Path,
    ref: Path,
    wd: Path,
    crashes: int,
    seed: int,
    steps: int,
    verify: bool,
    env: dict[str, str],
) -> None:
    """``crash-test --nproc N``: the campaign under torchrun, then the same job uninterrupted."""
    import shutil

    from ..bench.crashtest import RunRecord, describe_run
    from ..bench.multiproc import run_torchrun_campaign, set_differences

    seen: list[RunRecord] = []

    def on_run(r: RunRecord) -> None:
        click.echo(describe_run(r, seen[-1] if seen else None))
        seen.append(r)

    result = run_torchrun_campaign(
        [*base, "--mirror", str(mirror_path)],
        nproc=nproc,
        events_path=wd / "events.jsonl",
        log_path=wd / "train.log",
        crashes=crashes,
        seed=seed,
        env=env,
        on_run=on_run,
        total_steps=steps,
    )
    click.echo(
        f"{result.crashes} workers killed, job finished: {result.finished} "
        f"({nproc} processes under torchrun); logs in {wd}"
    )
    if not verify:
        return
    try:
        run_torchrun_campaign(
            [*base, "--mirror", str(ref)],
            nproc=nproc,
            events_path=wd / "reference.events.jsonl",
            log_path=wd / "reference.log",
            crashes=0,
            env=env,
        )
        diffs = set_differences(mirror_path, ref, key, nproc)
    finally:
        shutil.rmtree(ref, ignore_errors=True)
    if diffs:
        raise ConfigError(
            "the resumed run differs from an uninterrupted run in: " + ", ".join(diffs[:5])
        )
    click.echo(
        f"bit-for-bit identical to an uninterrupted {nproc}-process run "
        "(every process's mirror): yes"
    )


def _standby_campaign(
    base: list[str], mirror: Path, wd: Path, crashes: int, seed: int, env: dict[str, str]
) -> None:
    """``crash-test --standby``: kill a standby pair's trainer; print what each kill cost."""
    from ..bench.standby import lost_times, run_standby_campaign, summary

    camp = run_standby_campaign(
        [*base, "--mirror", str(mirror)],
        events_path=wd / "events.jsonl",
        log_path=wd / "train.log",
        plan=["trainer"] * crashes,
        seed=seed,
        env=env,
        on_kill=lambda k: click.echo(f"killed the trainer (pid {k.pid}) after step {k.step}"),
    )
    lost = lost_times(camp)
    s = summary([x["lost"] for x in lost])
    d = summary([x["detect"] for x in lost])
    click.echo(
        f"{len(camp.kills)} crashes taken over by a warm spare, job finished: True; logs in {wd}"
    )
    if lost:
        click.echo(
            f"time lost to a SIGKILL (kill to the end of the next step, less one step of "
            f"{lost[0]['step'] * 1e3:.1f} ms): median {s['median'] * 1e3:.0f} ms, worst "
            f"{s['worst'] * 1e3:.0f} ms over {len(lost)} kills; of it the kernel's teardown "
            f"of the killed process until its death is seen: median {d['median'] * 1e3:.0f} ms"
        )
