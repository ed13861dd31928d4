"""``plinius demo``: crash, resume, and prove the result is the same.

On a fresh machine, in a scratch directory: generate a key, seal the built-in
digits dataset into (emulated) persistent memory, train the reference CNN while
the training process is killed with SIGKILL at random moments and resumed each
time, train the same job again without interruption, and report: crashes,
recovery time of each resume, mirror save/restore time against an encrypted SSD
checkpoint of the same state, accuracy, and whether the two final states are
bit-for-bit identical. A PNG shows the loss curves with the crashes marked
(the original Plinius paper's Fig. 9) where matplotlib (the ``plots`` extra) is
installed; without it the demo says so and skips only the PNG.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .crashtest import (
    CampaignResult,
    RunRecord,
    describe_run,
    mirror_differences,
    read_events,
    run_campaign,
)
from .multiproc import check_nproc, run_torchrun_campaign, set_differences
from .report import PLOTS_MISSING, plots_available
from .standby import as_runs, cold_lost_times, lost_times, run_standby_campaign, step_time

if TYPE_CHECKING:  # pragma: no cover
    from ..models import ModelSpec

__all__ = ["DemoConfig", "DemoReport", "run_demo"]


@dataclass
class DemoConfig:
    """Knobs of the demo; the defaults finish in well under 3 minutes on 2 cores.

    Attributes:
        workdir: Where the key, logs, events, report and PNG go (default: a new
            temporary directory, kept).
        pm_dir: The persistent-memory directory for the datasets and mirrors
            (default ``/dev/shm``, else ``workdir``); a private directory is
            made inside it and removed unless ``keep``.
        crashes: SIGKILLs during the crashed run.
        steps: Steps of the job.
        model: A built-in model or a Darknet ``.cfg`` path.
        batch_size: Records per step.
        seed: Seed of training and of the kills.
        threads: torch threads of the training processes (exact resume needs the same).
        timing_repeats: Repetitions of each save/restore timing (the median is kept).
        keep: Keep the mirrors and sealed datasets.
        plot: Draw the loss curves (needs matplotlib, the ``plots`` extra;
            skipped with a note without it).
        reference_mb: Also time save/restore for a reference CNN of this many
            MB (0: skip).
        nproc: Train in this many processes under torchrun, killing random
            workers (``None``: one process, no torchrun).
        standby: Run the crashed job as a standby pair (``plinius train
            --standby``: each kill is taken over by a warm spare), and time a
            cold restart beside it on a short job of its own; ``False``:
            restart the crashed job cold after each kill.
        cold_crashes: With ``standby``, the kills of the cold-restart job.
    """

    workdir: Path | None = None
    pm_dir: Path | None = None
    crashes: int = 2
    steps: int = 2500
    model: str = "cnn-tiny"
    batch_size: int = 64
    seed: int = 0
    threads: int = 1
    timing_repeats: int = 5
    keep: bool = False
    plot: bool = True
    reference_mb: float = 10.0
    nproc: int | None = None
    standby: bool = True
    cold_crashes: int = 1


@dataclass
class DemoReport:
    """Everything the demo measured (also written as ``report.json``).

    Times are medians in milliseconds; ``identical`` is the verdict: the
    crashed-and-resumed job's final state equals the uninterrupted one's bit
    for bit (``differences`` names what differs otherwise, at most 20).
    ``reference`` holds the same timings for the reference CNN (or ``None``),
    ``plot`` the PNG's path (``None`` when not drawn; ``notes`` says why).
    """

    workdir: str
    pm_dir: str
    pm_kind: str
    crashes: int
    resumes: list[dict[str, Any]]
    identical: bool
    differences: list[str]
    losses_identical: bool
    accuracy_crashed: float
    accuracy_clean: float
    mirror_save_ms: float
    mirror_restore_ms: float
    ssd_save_ms: float
    ssd_restore_ms: float
    state_bytes: int
    reference: dict[str, float] | None
    plot: str | None
    wall_s: float
    notes: list[str] = field(default_factory=list)
    standby: bool = False
    lost_standby_ms: list[float] = field(default_factory=list)
    lost_cold_ms: list[float] = field(default_factory=list)


def _seal_digits(pm_dir: Path, key: Any) -> tuple[Path, Path]:
    """Seal the built-in digits (as `plinius seal --builtin digits` does) as train/test."""
    import numpy as np

    from ..data import seal_dataset
    from ..data.sources import load_builtin

    fields = load_builtin("digits")
    images, labels = fields["image"], fields["label"]
    # A fixed permutation so both splits hold every class.
    order = np.random.default_rng(1234).permutation(len(labels))
    images, labels = images[order], labels[order]
    n_train = 1500
    train = pm_dir / "digits-train.pld"
    test = pm_dir / "digits-test.pld"
    seal_dataset(train, key, {"image": images[:n_train], "label": labels[:n_train]})
    seal_dataset(test, key, {"image": images[n_train:], "label": labels[n_train:]})
    return train, test


def _compare(
    state: dict[str, Any],
    ckpt_state: dict[str, Any],
    key: Any,
    pm_dir: Path,
    workdir: Path,
    repeats: int,
) -> dict[str, float]:
    """Median save and restore of one state: mirror in PM vs encrypted disk checkpoint."""
    from ..mirror import Mirror
    from .baselines import encrypted_checkpoint_load, encrypted_checkpoint_save

    scratch = pm_dir / "timing.plm"
    ckpt = workdir / "checkpoint.enc"
    save_t: list[float] = []
    restore_t: list[float] = []
    ssd_save: list[float] = []
    ssd_load: list[float] = []
    try:
        with Mirror(scratch, key) as m:
            m.save(state, step=1)  # lay out the file once, as training does
            for i in range(repeats):
                t0 = time.perf_counter()
                m.save(state, step=i + 2)
                save_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                m.restore(state)
                restore_t.append(time.perf_counter() - t0)
            nbytes = m.info().tensor_bytes
        for _ in range(repeats):
            ssd_save.append(encrypted_checkpoint_save(ckpt_state, ckpt, key).total)
            _, t = encrypted_checkpoint_load(ckpt, key)
            ssd_load.append(t.total)
    finally:
        scratch.unlink(missing_ok=True)
        ckpt.unlink(missing_ok=True)
    return {
        "mirror_save_ms": statistics.median(save_t) * 1e3,
        "mirror_restore_ms": statistics.median(restore_t) * 1e3,
        "ssd_save_ms": statistics.median(ssd_save) * 1e3,
        "ssd_restore_ms": statistics.median(ssd_load) * 1e3,
        "state_bytes": float(nbytes),
    }


@dataclass(frozen=True)
class _FinalState:
    """A demo job's training state, rebuilt as ``plinius train`` builds it and restored
    from its mirror: the mirrored dict and the objects in it."""

    state: dict[str, Any]
    spec: ModelSpec
    optimizer: Any
    scheduler: Any | None
    losses: Any  # the float64 tensor of every step's loss


def _restored_state(cfg: DemoConfig, key: Any, data: Path, mirror_path: Path) -> _FinalState:
    """The demo job's training state, built as ``plinius train`` builds it, restored.

    Under torchrun (``cfg.nproc``), ``mirror_path`` is the set's first process's file.
    """
    import torch

    from ..data import SealedDataset
    from ..job import build_job
    from ..mirror import Mirror
    from ..train import make_sampler, training_state

    with SealedDataset(data, key) as ds:
        spec, _ = build_job(cfg.model, ds, None, cfg.seed)
        optimizer = spec.make_optimizer(None)
        scheduler = spec.make_scheduler(optimizer, cfg.steps)
        sampler = make_sampler(ds, seed=cfg.seed, shuffle="chunk")
    losses = torch.zeros(cfg.steps, dtype=torch.float64)
    state = training_state(
        spec.module, optimizer, scheduler=scheduler, sampler=sampler, losses=losses, total=cfg.steps
    )
    if cfg.nproc is not None:
        state["dist"] = None  # which job and place the file belongs to (differs by job)
    with Mirror(mirror_path, key, readonly=True) as m:
        m.restore(state)
    return _FinalState(state, spec, optimizer, scheduler, losses)


def _plain_differences(a: _FinalState, b: _FinalState) -> list[str]:
    """What differs between two restored states beyond their tensors: step counters,
    sampler position, scheduler, optimizer hyper-parameters, job settings."""
    diffs = []
    for name in ("total_steps", "dataset_id", "job"):
        if a.state[name] != b.state[name]:
            diffs.append(name)
    if a.state["sampler"].state_dict() != b.state["sampler"].state_dict():
        diffs.append("sampler")
    if a.optimizer.state_dict()["param_groups"] != b.optimizer.state_dict()["param_groups"]:
        diffs.append("optim.param_groups")
    if a.scheduler is None or b.scheduler is None:
        if (a.scheduler is None) != (b.scheduler is None):
            diffs.append("sched")
    elif a.scheduler.state_dict() != b.scheduler.state_dict():
        diffs.append("sched")
    return diffs


def _timings(
    cfg: DemoConfig, key: Any, final: _FinalState, pm_dir: Path, workdir: Path
) -> dict[str, float]:
    """The demo job's final training state (restored from its mirror), then compared."""
    ckpt_state = {
        "model": final.spec.module.state_dict(),
        "optim": final.optimizer.state_dict(),
        "sched": final.scheduler.state_dict() if final.scheduler is not None else None,
        "losses": final.losses,
    }
    return _compare(final.state, ckpt_state, key, pm_dir, workdir, cfg.timing_repeats)


def _timings_reference(
    mb: float, key: Any, pm_dir: Path, workdir: Path, repeats: int
) -> dict[str, float]:
    """The same comparison for the paper's smallest model: a reference CNN of ``mb`` MB
    with SGD momentum (weights + momentum = twice the parameters)."""
    import torch

    from ..models import reference_cnn

    model = reference_cnn(mb, in_channels=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(2, 1, 8, 8)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()  # type: ignore[no-untyped-call]
    opt.step()
    state = {"model": model, "optim": opt}
    ckpt_state = {"model": model.state_dict(), "optim": opt.state_dict()}
    return _compare(state, ckpt_state, key, pm_dir, workdir, repeats)


def _accuracy(cfg: DemoConfig, key: Any, mirror_path: Path, test: Path, train: Path) -> float:
    from ..data import SealedDataset
    from ..job import build_job, label_classes
    from ..mirror import Mirror
    from ..train import evaluate

    with SealedDataset(train, key) as tr:
        classes = label_classes(tr)  # as `plinius train` counts them: max label + 1
    with SealedDataset(test, key) as ds:
        spec, _ = build_job(cfg.model, ds, classes, cfg.seed)
        with Mirror(mirror_path, key, readonly=True) as m:
            m.restore_model(spec.module)
        acc, _ = evaluate(
            spec.module, ds, loss_fn=spec.loss, prepare=spec.prepare, split=spec.split
        )
    return acc


def _plot(path: Path, crashed: CampaignResult, clean: CampaignResult, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    clean_pts = [p for r in clean.runs for p in r.steps]
    ax.plot(
        [p.step for p in clean_pts],
        [p.loss for p in clean_pts],
        color="#999999",
        lw=3.0,
        label="uninterrupted run",
        zorder=1,
    )
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for r in crashed.runs:
        if not r.steps:
            continue
        c = colors[r.index % len(colors)]
        ax.plot(
            [p.step for p in r.steps],
            [p.loss for p in r.steps],
            color=c,
            lw=1.2,
            label=f"run {r.index + 1}" + (" (killed)" if r.killed else ""),
            zorder=2,
        )
    first = True
    for r in crashed.runs:
        if r.killed and r.steps:
            s = r.steps[-1].step
            ax.axvline(s, color="red", ls="--", lw=0.8, label="SIGKILL" if first else None)
            first = False
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_yscale("log")
    ax.set_xlim(0, steps)
    ax.set_title("Training killed with SIGKILL and resumed from the PM mirror")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _crashed_runs(
    cfg: DemoConfig, base: list[str], mirror: Path, workdir: Path, env: dict[str, str]
) -> tuple[CampaignResult, list[float], list[float]]:
    """The crashed job's runs, and the seconds each kill cost with the standby and cold."""
    if not cfg.standby:
        crashed = run_campaign(
            [*base, "--mirror", str(mirror)],
            events_path=workdir / "crashed.events.jsonl",
            log_path=workdir / "crashed.log",
            crashes=cfg.crashes,
            seed=cfg.seed,
            env=env,
            total_steps=cfg.steps,
        )
        evs, _ = read_events(workdir / "crashed.events.jsonl")
        return crashed, [], cold_lost_times(crashed, step_time(evs) or 0.0)
    camp = run_standby_campaign(
        [*base, "--mirror", str(mirror)],
        events_path=workdir / "crashed.events.jsonl",
        log_path=workdir / "crashed.log",
        plan=["trainer"] * cfg.crashes,
        seed=cfg.seed,
        env=env,
        allow_fewer=True,  # a job shorter than the spares' preparation: fewer kills
    )
    lost = [x["lost"] for x in lost_times(camp)]
    cold: list[float] = []
    if cfg.cold_crashes:
        # A short job of its own: only the restart is timed.
        steps = ["--steps", str(min(cfg.steps, 60))]
        cold_mirror = mirror.with_name("cold.plm")
        res = run_campaign(
            [*base, *steps, "--mirror", str(cold_mirror)],
            events_path=workdir / "cold.events.jsonl",
            log_path=workdir / "cold.log",
            crashes=cfg.cold_crashes,
            seed=cfg.seed,
            env=env,
            total_steps=min(cfg.steps, 60),
        )
        cold_mirror.unlink(missing_ok=True)
        evs, _ = read_events(workdir / "cold.events.jsonl")
        cold = cold_lost_times(res, step_time(evs) or 0.0)
    return as_runs(camp), lost, cold


def run_demo(cfg: DemoConfig, log: Any = print) -> DemoReport:
    """Run the whole demonstration (see the module docstring) and report what it measured.

    Args:
        cfg: The demo's settings.
        log: Called with each progress line (plain text).

    Returns:
        The :class:`DemoReport`, also written as ``report.json`` into the work directory.

    Raises:
        ConfigError: Fewer than 10 steps or a negative number of crashes, or a
            model the digits cannot train.
        PliniusError: A training run failed (the message names its log).
    """
    from ..crypto import MasterKey
    from ..dist import member_path
    from ..pmem import describe_path

    t_begin = time.perf_counter()
    if cfg.crashes < 0 or cfg.steps < 10:
        raise ConfigError("the demo needs at least 10 steps and a non-negative number of crashes")
    if cfg.nproc is not None:
        check_nproc(cfg.nproc, cfg.batch_size)
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="plinius-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    pm_root = cfg.pm_dir or (shm if shm.is_dir() else workdir)
    pm_dir = Path(tempfile.mkdtemp(prefix="plinius-demo-", dir=pm_root))
    try:
        key_path = workdir / "owner.key"
        if key_path.exists():
            key_path.unlink()
        key = MasterKey.generate()
        key.save(key_path)
        log(f"key: {key_path} (fingerprint {key.fingerprint.hex()})")
        train, test = _seal_digits(pm_dir, key)
        log(f"sealed the digits dataset into {pm_dir} ({describe_path(pm_dir)})")
        base = [
            "--key", str(key_path), "--data", str(train), "--model", cfg.model,
            "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
            "--seed", str(cfg.seed), "--threads", str(cfg.threads),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONHASHSEED="0")
        # Under torchrun each mirror is a set (a directory, one file per process).
        suffix = "" if cfg.nproc is None else "-set"
        crash_mirror = pm_dir / f"crashed.plm{suffix}"
        clean_mirror = pm_dir / f"clean.plm{suffix}"

        seen: list[RunRecord] = []

        def on_run(r: RunRecord) -> None:
            # The same words as crash-test: a killed run's last step may not have been
            # committed yet, and the next run says it redoes it.
            line = describe_run(r, seen[-1] if seen else None)
            rec = "" if r.recovery_s is None else f" (restore {r.recovery_s * 1e3:.1f} ms)"
            seen.append(r)
            log(f"  {line}{rec}")

        procs = "" if cfg.nproc is None else f" in {cfg.nproc} processes under torchrun"
        how = " (a standby pair)" if cfg.standby and cfg.nproc is None else ""
        log(f"training {cfg.model} for {cfg.steps} steps{procs} with {cfg.crashes} SIGKILLs{how}")
        campaign: Any = run_campaign
        lost_standby: list[float] = []
        lost_cold: list[float] = []
        if cfg.nproc is not None:  # torchrun restarts its ranks itself: no standby
            campaign = partial(run_torchrun_campaign, nproc=cfg.nproc)
            crashed = campaign(
                [*base, "--mirror", str(crash_mirror)],
                events_path=workdir / "crashed.events.jsonl",
                log_path=workdir / "crashed.log",
                crashes=cfg.crashes,
                seed=cfg.seed,
                env=env,
                on_run=on_run,
                total_steps=cfg.steps,
            )
        else:
            crashed, lost_standby, lost_cold = _crashed_runs(cfg, base, crash_mirror, workdir, env)
            for r in crashed.runs:
                on_run(r)
        log("training the same job without interruption ...")
        clean = campaign(
            [*base, "--mirror", str(clean_mirror)],
            events_path=workdir / "clean.events.jsonl",
            log_path=workdir / "clean.log",
            crashes=0,
            env=env,
            on_run=on_run,
        )
        if cfg.nproc is None:
            diffs = mirror_differences(crash_mirror, clean_mirror, key)
        else:
            diffs = set_differences(crash_mirror, clean_mirror, key, cfg.nproc)
            # Every process holds the same model, optimizer and losses: the first's will do.
            crash_mirror, clean_mirror = member_path(crash_mirror, 0), member_path(clean_mirror, 0)
        crashed_state = _restored_state(cfg, key, train, crash_mirror)
        clean_state = _restored_state(cfg, key, train, clean_mirror)
        diffs += _plain_differences(crashed_state, clean_state)
        loss_names = [d for d in diffs if d.startswith("losses")]
        timing = _timings(cfg, key, crashed_state, pm_dir, workdir)
        ref_timing = (
            _timings_reference(cfg.reference_mb, key, pm_dir, workdir, cfg.timing_repeats)
            if cfg.reference_mb
            else None
        )
        acc_crashed = _accuracy(cfg, key, crash_mirror, test, train)
        acc_clean = _accuracy(cfg, key, clean_mirror, test, train)
        plot_path: Path | None = None
        notes: list[str] = []
        if cfg.plot and plots_available():
            plot_path = workdir / "loss_curve.png"
            _plot(plot_path, crashed, clean, cfg.steps)
        elif cfg.plot:  # a bare install: everything but the PNG
            notes.append(f"loss curve skipped: {PLOTS_MISSING}")
            log(notes[-1])
        resumes = [
            {
                "run": r.index + 1,
                "resumed_from": r.resumed_from,
                "restore_ms": None if r.recovery_s is None else r.recovery_s * 1e3,
                "start_to_first_step_s": r.first_step_after_start_s,
                "killed": r.killed,
                "kill_after_s": r.kill_after_s,
            }
            for r in crashed.runs
        ]
        report = DemoReport(
            workdir=str(workdir),
            pm_dir=str(pm_dir),
            pm_kind=describe_path(pm_dir),
            crashes=crashed.crashes,
            resumes=resumes,
            identical=not diffs,
            differences=diffs[:20],
            losses_identical=not loss_names,
            accuracy_crashed=acc_crashed,
            accuracy_clean=acc_clean,
            mirror_save_ms=timing["mirror_save_ms"],
            mirror_restore_ms=timing["mirror_restore_ms"],
            ssd_save_ms=timing["ssd_save_ms"],
            ssd_restore_ms=timing["ssd_restore_ms"],
            state_bytes=int(timing["state_bytes"]),
            reference=ref_timing,
            plot=str(plot_path) if plot_path else None,
            wall_s=time.perf_counter() - t_begin,
            standby=cfg.standby,
            lost_standby_ms=[x * 1e3 for x in lost_standby],
            lost_cold_ms=[x * 1e3 for x in lost_cold],
            notes=[
                f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
                f"torch threads {cfg.threads}"
                + ("" if cfg.nproc is None else f", {cfg.nproc} processes under torchrun"),
                "SSD checkpoint = torch.save to a buffer, AES-256-GCM, write temp file, fsync, "
                f"rename, fsync directory, in {workdir}",
                *notes,
            ],
        )
        (workdir / "report.json").write_text(json.dumps(asdict(report), indent=2))
        return report
    finally:
        if not cfg.keep:
            shutil.rmtree(pm_dir, ignore_errors=True)
