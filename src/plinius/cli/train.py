"""``plinius train`` and ``plinius evaluate``: resumable training from the command line."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, StateMismatchError
from ..job import (
    EventLog,
    build_job,
    init_model_from,
    load_key,
    make_counter,
    model_settings,
    process_age_s,
)
from ..standby import Turn, refuse_torchrun
from ._durable import durable_owns, durable_path, open_durable
from ._freshness import READ_COUNTER_HELP, counter_option, open_for_reading, train_note
from ._freshness import unchecked_note as _unchecked_note
from ._json import echo_json, json_option
from ._paths import check_distinct_paths, job_paths
from ._standby import is_worker, report_takeover, supervise_train, take_turn
from ._torchrun import check_replicas, torchrun_job

_T_ENTRY = time.perf_counter()  # when the CLI module was imported (after the interpreter)


def register(group: click.Group) -> None:
    """Add the training commands to ``group``."""
    group.add_command(train)
    group.add_command(evaluate)


def _given(name: str) -> bool:
    """Whether option ``name`` was given on the command line (not a default or the environment)."""
    ctx = click.get_current_context()
    return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def check_key_options(key_path: Path | None, key_server: str | None) -> None:
    """Refuse key options that contradict each other (before anything is loaded)."""
    if key_path is None:
        return
    if key_server is not None and not _given("key_server"):
        raise ConfigError(
            "give either --key or --key-server, not both: PLINIUS_KEY_SERVER is set in the "
            "environment; unset it to use --key"
        )
    unused = [
        f"--{n.replace('_', '-')}"
        for n in ("key_server_pubkey", "sealed_key", "job_id")
        if _given(n)
    ]
    if unused and key_server is None:
        verb, it = ("applies", "it") if len(unused) == 1 else ("apply", "they")
        raise click.UsageError(
            f"{', '.join(unused)} only {verb} to key release (--key-server); "
            f"with --key {it} would be ignored"
        )


def loss_text(loss: float | None) -> str:
    """The progress bar's loss: ``-`` until a step has computed one (never ``nan``)."""
    if loss is None or math.isnan(loss):
        return "-"
    return f"{loss:.4f}"


def resume_parts(*, model: float, key: float, open: float, restore: float) -> str:
    """The time a resume took, then its parts (seconds in): the total leads, so a
    slow model build is not hidden behind a fast restore."""

    def ms(s: float) -> str:
        return f"{s * 1e3:.0f} ms" if s >= 0.1 else f"{s * 1e3:.1f} ms"

    total = model + key + open + restore
    head = f"{total:.2f} s" if total >= 1 else ms(total)
    return (
        f"{head}: model {ms(model)}, key {ms(key)}, mirror open {ms(open)}, restore {ms(restore)}"
    )


# Seconds between two plain progress lines (outside a terminal); tests lower it.
PROGRESS_INTERVAL_S = 5.0


def make_progress(
    enabled: bool,
    total: int,
    *,
    plain: bool = False,
    interval_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Callable[[Any], None], Callable[[], None]]:
    """A rich progress bar, plain progress lines, or nothing; and its closer.

    Args:
        enabled: Draw the rich bar (a terminal, or ``--progress``).
        total: The job's total steps.
        plain: When not ``enabled``, print a line such as
            ``step 120/500  loss 0.4321  3.1 steps/s`` every ``interval_s``
            instead (stdout is not a terminal and no ``--no-progress``), so a
            log shows the job is alive.
        interval_s: Seconds between plain lines (default
            :data:`PROGRESS_INTERVAL_S`).
        clock: Monotonic seconds (tests pass a fake one).

    Returns:
        ``(update, stop)``: call ``update(event)`` after every step, ``stop()`` at the end.
    """
    if not enabled and plain:
        every = PROGRESS_INTERVAL_S if interval_s is None else interval_s
        last = {"t": clock(), "step": -1}

        def line(ev: Any) -> None:
            now = clock()
            if last["step"] < 0:  # the first step (or the first after a resume)
                last["step"] = ev.step - 1
            dt = now - last["t"]
            if dt < every:
                return
            rate = (ev.step - last["step"]) / dt if dt > 0 else float("nan")
            click.echo(f"step {ev.step}/{total}  loss {loss_text(ev.loss)}  {rate:.1f} steps/s")
            last["t"], last["step"] = now, ev.step

        return line, (lambda: None)
    if not enabled:
        return (lambda _ev: None), (lambda: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        transient=False,
    )
    progress.start()
    task = progress.add_task("train", total=total, loss=loss_text(None))

    def update(ev: Any) -> None:
        progress.update(task, completed=ev.step, loss=loss_text(ev.loss))

    return update, progress.stop


_key_options = [
    click.option("--key", "key_path", type=click.Path(path_type=Path), help="Master key file."),
    click.option(
        "--key-server",
        envvar="PLINIUS_KEY_SERVER",
        help="Key server URL: obtain the key after attestation (env PLINIUS_KEY_SERVER).",
    ),
    click.option(
        "--key-server-pubkey",
        envvar="PLINIUS_KEY_SERVER_PUBKEY",
        help="The key server's public key, hex (env PLINIUS_KEY_SERVER_PUBKEY).",
    ),
    click.option(
        "--sealed-key",
        type=click.Path(path_type=Path),
        help="Where the released key is sealed locally (restarts need no round trip).",
    ),
    click.option(
        "--job-id", default=None, help="Job id for key release (default: the mirror name)."
    ),
]


# Options shared by the commands that train or read a job (train, evaluate, crash-test).
data_option = click.option(
    "--data", "data_path", required=True, type=click.Path(path_type=Path), help="Sealed dataset."
)
num_classes_option = click.option(
    "--num-classes",
    default=None,
    type=click.IntRange(min=2),
    help="Classes (default: from the labels).",
)


def mirror_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The required ``--mirror`` option, with this command's help text."""
    return click.option(
        "--mirror", "mirror_path", required=True, type=click.Path(path_type=Path), help=help_text
    )


def _with_key_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(_key_options):
        f = opt(f)
    return f


@click.command()
@_with_key_options
@data_option
@mirror_option("Mirror file (persistent memory).")
@click.option(
    "--model", "model_name", required=True, help="Built-in model name or a Darknet .cfg path."
)
@click.option("--steps", required=True, type=click.IntRange(min=1), help="Total steps of the job.")
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(min=1),
    help="Batch size (default: the model's, else 128).",
)
@click.option(
    "--lr",
    default=None,
    type=float,
    help="Learning rate override (above 0, at most 1000).",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(0, 2**63 - 1),
    help="Seed of the model init and data order.",
)
@click.option(
    "--mirror-every",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Mirror every K steps.",
)
@click.option(
    "--sync-save", is_flag=True, help="Mirror synchronously instead of overlapping the next step."
)
@click.option(
    "--shuffle",
    type=click.Choice(["chunk", "full", "none"]),
    default="chunk",
    show_default=True,
    help="Data order: chunk-local shuffle (fast), uniform, or none.",
)
@num_classes_option
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="torch threads (exact resume needs the same).",
)
@click.option(
    "--counter",
    "counter_spec",
    default=None,
    help="Trusted freshness counter: file:PATH (simulation, insecure), tpm[:TCTI] "
    "(TPM 2.0 NV counter), or keyserver (the --key-server's per-job counter).",
)
@click.option(
    "--counter-every",
    default=None,
    type=click.IntRange(min=1),
    help="Advance the counter every K commits (default 1; 100 for a TPM, which wears).",
)
@click.option(
    "--counter-interval",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Also advance it when this many seconds passed since the last advance.",
)
@click.option("--dataset-id", default=None, help="Require this sealed dataset id.")
@click.option(
    "--durable-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep a durable copy of the mirror in this directory on disk (survives a reboot).",
)
@click.option(
    "--durable-every",
    default=None,
    type=click.IntRange(min=1),
    help="Copy every N steps (default 100 unless --durable-interval is given).",
)
@click.option(
    "--durable-interval",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Copy when this many seconds passed since the last copy.",
)
@click.option(
    "--events",
    "events_path",
    type=click.Path(path_type=Path),
    help="Append JSON-lines progress events here.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar (default: in a terminal; elsewhere a plain line every 5 s).",
)
@click.option(
    "--init-from",
    type=click.Path(path_type=Path),
    default=None,
    help="Fine-tune: start a new job from this mirror's model weights (read-only).",
)
@click.option(
    "--standby",
    is_flag=True,
    help="Keep a warm spare process that takes over within milliseconds if training dies.",
)
@click.option(
    "--elastic",
    is_flag=True,
    help="Under torchrun (--nnodes=MIN:MAX): go on with another number of processes than "
    "wrote the mirror set (a machine lost or joined).",
)
@click.option(
    "--replicas",
    default=0,
    show_default=True,
    type=int,
    help="Under torchrun across machines: 1 keeps every process's sealed replica on the "
    "other machines, so the job survives the loss of a machine; 0 keeps none.",
)
def train(
    key_path: Path | None,
    key_server: str | None,
    key_server_pubkey: str | None,
    sealed_key: Path | None,
    job_id: str | None,
    data_path: Path,
    mirror_path: Path,
    model_name: str,
    steps: int,
    batch_size: int | None,
    lr: float | None,
    seed: int,
    mirror_every: int,
    sync_save: bool,
    shuffle: str,
    num_classes: int | None,
    threads: int | None,
    counter_spec: str | None,
    counter_every: int | None,
    counter_interval: float | None,
    dataset_id: str | None,
    durable_dir: Path | None,
    durable_every: int | None,
    durable_interval: float | None,
    events_path: Path | None,
    progress: bool | None,
    init_from: Path | None,
    standby: bool,
    elastic: bool,
    replicas: int,
) -> None:
    """Train MODEL on a sealed dataset, mirroring every step; resumes automatically.

    Rerunning the same command after a crash finishes the same job: --steps is
    the job's total, and the result is bit-for-bit the uninterrupted one. A
    larger --steps continues a job (the schedule re-planned for the new total).
    """
    check_key_options(key_path, key_server)
    if lr is not None:
        from ..train import check_learning_rate

        check_learning_rate(lr, "--lr")
    if counter_spec is None:
        given = (("--counter-every", counter_every), ("--counter-interval", counter_interval))
        stray = [flag for flag, value in given if value is not None]
        if stray:
            verb = "needs" if len(stray) == 1 else "need"
            raise click.UsageError(f"{' and '.join(stray)} {verb} --counter")
    if standby:
        refuse_torchrun()  # torchrun restarts its ranks itself
    # Under torchrun: several processes, one mirror set (cli/_torchrun.py).
    job = torchrun_job()
    if elastic and job is None:
        raise click.UsageError("--elastic is for a job under torchrun (--nnodes=MIN:MAX)")
    check_replicas(replicas, job)
    if job is not None:
        job.elastic = elastic
        job.check_options(
            counter_interval=counter_interval, durable_dir=durable_dir, init_from=init_from
        )
        if batch_size is not None:
            job.check_batch(batch_size)
    elif mirror_path.is_dir() and any(mirror_path.glob("local-*.plm")):
        raise ConfigError(
            f"{mirror_path} is the mirror set of a multi-process job: resume it with torchrun "
            "and as many processes as wrote it (plinius inspect shows how many)"
        )
    durable_file = durable_path(durable_dir, durable_every, durable_interval, mirror_path)
    # Appending events to the key, dataset, mirror or counter would damage it.
    check_distinct_paths(
        job_paths(
            key=key_path,
            data=data_path,
            mirror=mirror_path,
            sealed_key=sealed_key,
            counter_spec=counter_spec,
            events=events_path,
            model=model_name,
        )
        | {"--init-from": init_from},
        {"--durable-dir": (durable_dir, durable_owns(mirror_path))},
    )
    if standby and not is_worker():  # the supervisor: no torch, no key
        supervise_train(click.get_current_context(), events_path)
    age = process_age_s()
    t_start = time.perf_counter()
    events = EventLog(events_path if job is None or job.speaks else None)
    events.write("start", pid=os.getpid(), process_age_s=age, imports_s=t_start - _T_ENTRY)
    import torch

    from ..data import SealedDataset
    from ..mirror import Mirror
    from ..train import fit

    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with job.one_at_a_time(sealed_key) if job is not None else contextlib.nullcontext():
        key, key_source = load_key(
            key_path, key_server, key_server_pubkey, sealed_key, job_id or mirror_path.name
        )
    t_key = time.perf_counter() - t0
    t0 = time.perf_counter()
    with SealedDataset(data_path, key, expect_id=dataset_id) as ds:
        spec, classes = build_job(model_name, ds, num_classes, seed)
        model_batch = spec.hyper.get("batch")  # the model's (or cfg's) own batch size
        bs = batch_size or (model_batch if isinstance(model_batch, int) and model_batch else 128)
        if job is not None:
            job.check_batch(bs)
            job.start()
        optimizer = spec.make_optimizer(lr)
        scheduler = spec.make_scheduler(optimizer, steps)
        t_build = time.perf_counter() - t0
        # A spare waits here, prepared, until the trainer dies.
        turn = take_turn(mirror_path, spec, ds, bs) if standby else None
        with job.alike() if job is not None else contextlib.nullcontext():
            counter, every = make_counter(
                counter_spec, key, key_server, key_server_pubkey, job_id or mirror_path.name
            )
        if counter_every is not None:
            every = counter_every
        durable, report_durable = open_durable(
            durable_file, durable_every, durable_interval, mirror_path, key, counter, events
        )
        if init_from is not None and not mirror_path.exists():
            # Read the old job before the new mirror is created: a bad --init-from leaves nothing.
            _init_from(init_from, None, key, spec.module, model_name, mirror_path)
            init_from = None
        t0 = time.perf_counter()
        opened: Any = (
            job.open_mirror(mirror_path, key, replicas=replicas, counter=counter, every=every)
            if job is not None
            else Mirror(
                mirror_path,
                key,
                counter=counter,
                counter_every=every if counter is not None else 1,
                counter_interval_s=counter_interval,
            )
        )
        with opened as mirror:
            t_open = time.perf_counter() - t0
            own = mirror.mirror if job is not None else mirror
            speaks = job is None or job.speaks
            if counter is None and speaks:
                click.echo(train_note(own.info()), err=True)
            if init_from is not None:
                _init_from(init_from, mirror.info().step, key, spec.module, model_name, mirror_path)
            show = sys.stdout.isatty() if progress is None else progress
            update, stop = make_progress(show and speaks, steps, plain=progress is None and speaks)

            def on_step(ev: Any) -> None:
                events.write("step", step=ev.step, loss=ev.loss, saved=ev.saved)
                if turn is not None:
                    turn.stepped()
                update(ev)
                report_durable()

            try:
                result = fit(
                    spec.module if job is None else job.wrap(spec.module),
                    optimizer,
                    loss_fn=spec.loss,
                    dataset=ds,
                    batch_size=bs,
                    steps=steps,
                    seed=seed,
                    mirror=mirror,
                    scheduler=scheduler,
                    mirror_every=mirror_every,
                    async_save=not sync_save,
                    shuffle=False if shuffle == "none" else shuffle,  # type: ignore[arg-type]
                    prepare=spec.prepare,
                    split=spec.split,
                    callback=on_step,
                    on_replan=lambda said: _report_replan(events, said, speaks),
                    on_resume=lambda r, s: _report_resume(
                        events,
                        r,
                        s,
                        steps,
                        t_key,
                        t_build,
                        t_open,
                        age,
                        t_start - _T_ENTRY,
                        speaks,
                        turn,
                    ),
                    # A resume with another model or learning rate is refused.
                    job_info={
                        "model": model_name,
                        "lr": lr,
                        "classes": classes,
                        **model_settings(model_name, ds.fields[0].shape, ds.fields[0].dtype),
                    },
                    num_classes=classes,
                    durable=durable,
                )
            finally:
                stop()
                if durable is not None:
                    durable.close()  # waits for the copy being written (no thread left)
        report_durable()  # a failure of the last copy (written by now)
    events.write(
        "done",
        final_step=result.final_step,
        final_loss=result.losses[-1],
        saves=result.saves,
        save_wait_s=result.save_wait_s,
    )
    events.close()
    procs = f", {job.world_size} processes" if job is not None else ""
    if job is None or job.speaks:
        click.echo(
            f"done: {result.final_step} steps of {spec.name} (batch {bs}{procs}, "
            f"{classes} classes), final loss {result.losses[-1]:.4f}; key from {key_source}"
        )
    if job is not None:
        job.finish()  # ends the process: nothing may follow


def _init_from(
    init_from: Path, step: int | None, key: Any, module: Any, model_name: str, mirror_path: Path
) -> None:
    """``--init-from``: a new job's model from another mirror; a resume never reads it."""
    if step is not None:
        click.echo(
            f"note: --init-from {init_from} not read: {mirror_path} already holds this job "
            f"(step {step}), which resumes"
        )
        return
    old_step, info = init_model_from(init_from, key, module, model_name)
    click.echo(_unchecked_note(info), err=True)
    click.echo(
        f"initialised the model from {init_from} (step {old_step} of its job); this job has "
        "its own optimizer, schedule, step counter and mirror"
    )


def _report_replan(events: EventLog, said: str, speaks: bool = True) -> None:
    if speaks:
        click.echo(said)
    events.write("replanned", message=said)


def _report_resume(
    events: EventLog,
    resumed: int | None,
    recovery_s: float,
    steps: int,
    t_key: float,
    t_build: float,
    t_open: float,
    age: float | None,
    imports_s: float,
    speaks: bool = True,
    turn: Turn | None = None,
) -> None:
    if not speaks:
        pass
    elif resumed is None:
        click.echo(f"starting a new job of {steps} steps (the mirror was empty)")
    else:
        click.echo(f"resumed after step {resumed} of {steps} in " + resume_parts(
            model=t_build, key=t_key, open=t_open, restore=recovery_s
        ))  # fmt: skip
    events.write(
        "resumed",
        step=resumed,
        recovery_s=recovery_s,
        key_s=t_key,
        build_s=t_build,
        open_s=t_open,
        imports_s=imports_s,
        process_age_at_start_s=age,
    )
    report_takeover(turn, events, resumed)


@click.command()
@_with_key_options
@data_option
@mirror_option("Mirror file.")
@click.option(
    "--model",
    "model_name",
    default=None,
    help="The model the job trained (default: the one the mirror records; a .cfg must be given).",
)
@click.option(
    "--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Batch size."
)
@num_classes_option
@counter_option(READ_COUNTER_HELP)
@json_option
def evaluate(
    key_path: Path | None,
    key_server: str | None,
    key_server_pubkey: str | None,
    sealed_key: Path | None,
    job_id: str | None,
    data_path: Path,
    mirror_path: Path,
    model_name: str | None,
    batch_size: int,
    num_classes: int | None,
    counter_spec: str | None,
    as_json: bool,
) -> None:
    """Accuracy and loss of the model in MIRROR on the sealed dataset DATA (read-only).

    The model is the one the job recorded (give --model for a Darknet cfg).
    The output says which data was scored: the job's own training set is
    named as such, since its accuracy is not a held-out estimate; seal a test
    set separately and pass it as --data for one.
    """
    from ..data import SealedDataset
    from ..train import evaluate as run_evaluate
    from ._jobinfo import job_of, model_for_evaluation, scored_on

    check_key_options(key_path, key_server)
    check_distinct_paths(
        job_paths(
            key=key_path,
            data=data_path,
            mirror=mirror_path,
            sealed_key=sealed_key,
            counter_spec=counter_spec,
            model=model_name,
        )
    )
    key, _ = load_key(
        key_path, key_server, key_server_pubkey, sealed_key, job_id or mirror_path.name
    )
    if not mirror_path.exists():
        raise ConfigError(f"mirror {mirror_path} does not exist; train first with 'plinius train'")
    with SealedDataset(data_path, key) as ds:
        with open_for_reading(
            mirror_path, key, counter_spec, key_server, key_server_pubkey, job_id
        ) as mirror:
            info = mirror.info()
            if info.generation == 0:
                raise ConfigError(f"mirror {mirror_path} holds no saved state yet; train first")
            job = job_of(mirror)
            model_name = model_for_evaluation(model_name, job, mirror_path)
            recorded = (job["settings"] or {}).get("classes")
            if num_classes is None and type(recorded) is int:
                num_classes = recorded  # the job's, even if this data lacks some classes
            spec, classes = build_job(model_name, ds, num_classes, 0)
            try:
                step = mirror.restore_model(spec.module)
            except StateMismatchError as exc:
                raise StateMismatchError(
                    f"{exc}. Is MODEL the one the job trained? If this dataset lacks some "
                    "classes, pass --num-classes with the training job's number of classes"
                ) from exc
        if step is None:
            raise ConfigError(f"mirror {mirror_path} holds no saved state yet; train first")
        acc, loss = run_evaluate(
            spec.module,
            ds,
            loss_fn=spec.loss,
            batch_size=batch_size,
            prepare=spec.prepare,
            split=spec.split,
            num_classes=classes,
        )
    if counter_spec is None:
        click.echo(_unchecked_note(info), err=True)
    if as_json:
        doc = {
            "mirror": str(mirror_path),
            "step": step,
            "model": model_name,
            "classes": classes,
            "accuracy": acc,
            "loss": loss,
            "records": len(ds),
            "data": str(data_path),
            "dataset_id": ds.dataset_id,
            "training_dataset_id": job["dataset_id"],
            "on_training_data": (
                None if job["dataset_id"] is None else ds.dataset_id == job["dataset_id"]
            ),
            "freshness_checked": counter_spec is not None,
        }
        echo_json(doc)
        return
    click.echo(f"step {step}: accuracy {acc * 100:.2f}% ({len(ds)} records), loss {loss:.4f}")
    click.echo(scored_on(data_path, len(ds), ds.dataset_id, job["dataset_id"]))
