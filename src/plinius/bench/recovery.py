"""Recovery time after SIGKILL, from process start to the first resumed step.

A crash campaign (:func:`plinius.bench.crashtest.run_campaign`) runs ``plinius train``
in a child process and kills it with SIGKILL a few times, each time after it
has logged a training step. Every run that resumed from a committed state is
split, from the JSON-lines events the child writes (``--events``), into:

- ``interpreter``: from the process's birth (``/proc``) to the start of the
  command: the Python interpreter and the CLI's imports;
- ``imports``: the rest of the time to the restore that the phases below do
  not account for: importing torch and the library, setting up the loop;
- ``key``: loading the master key;
- ``build``: opening the sealed dataset and building the model and optimizer;
- ``open``: opening the mirror;
- ``restore``: ``Mirror.restore`` of the full training state;
- ``first_step``: the first resumed training step (its save started).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..crypto import MasterKey
from ._common import BenchConfig, Progress, median
from .overhead import synthetic_mnist

__all__ = ["PHASES", "phase_breakdown", "run_recovery", "run_standby_recovery", "split_runs"]

PHASES = ("interpreter", "imports", "key", "build", "open", "restore", "first_step")


def split_runs(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The events of a campaign, one list per run (each run begins with a ``start`` event)."""
    runs: list[list[dict[str, Any]]] = []
    for e in events:
        if e.get("event") == "start" or not runs:
            runs.append([])
        runs[-1].append(e)
    return runs


def phase_breakdown(run: list[dict[str, Any]]) -> dict[str, float] | None:
    """Where the time went in one run that resumed from a committed state.

    Args:
        run: The events of one run (one list of :func:`split_runs`).

    Returns:
        Seconds per phase (:data:`PHASES`), their ``total`` and the step the run
        ``resumed_from``; ``None`` for a run that started a new job or was
        killed before its first resumed step.
    """
    start = next((e for e in run if e.get("event") == "start"), None)
    resumed = next((e for e in run if e.get("event") == "resumed"), None)
    step = next((e for e in run if e.get("event") == "step"), None)
    if start is None or resumed is None or step is None or resumed.get("step") is None:
        return None
    age = float(start.get("process_age_s") or 0.0)
    key, build = float(resumed["key_s"]), float(resumed["build_s"])
    opened, restore = float(resumed["open_s"]), float(resumed["recovery_s"])
    to_resumed = float(resumed["t"]) - float(start["t"])
    return {
        "interpreter": age,
        "imports": max(0.0, to_resumed - key - build - opened - restore),
        "key": key,
        "build": build,
        "open": opened,
        "restore": restore,
        "first_step": max(0.0, float(step["t"]) - float(resumed["t"])),
        "total": age + max(0.0, float(step["t"]) - float(start["t"])),
        "resumed_from": float(resumed["step"]),
    }


def run_recovery(
    cfg: BenchConfig, key: MasterKey, key_path: Path, pm: Path, disk: Path, progress: Progress
) -> dict[str, Any]:
    """Kill ``plinius train`` ``cfg.recovery_crashes`` times and time every recovery."""
    from ..data import seal_dataset
    from .crashtest import read_events, run_campaign

    records = max(256, cfg.recovery_batch * 16)
    data = pm / "recovery.pld"
    mirror = pm / "recovery.plm"
    events = disk / "recovery.events.jsonl"
    log = disk / "recovery.log"
    seal_dataset(data, key, synthetic_mnist(records, seed=2))
    args = [
        "--key", str(key_path), "--data", str(data), "--mirror", str(mirror),
        "--model", cfg.recovery_model, "--steps", str(cfg.recovery_steps),
        "--batch-size", str(cfg.recovery_batch), "--num-classes", "10",
        "--seed", "0", "--threads", "1",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONHASHSEED="0")
    try:
        with progress.section("recovery", cfg.recovery_crashes + 1) as advance:
            result = run_campaign(
                args,
                events_path=events,
                log_path=log,
                crashes=cfg.recovery_crashes,
                seed=0,
                window_s=cfg.recovery_window_s,
                startup_kill_fraction=0.0,
                timeout_s=600.0,
                env=env,
                on_run=lambda r: advance(
                    f"run {r.index + 1}: " + ("killed" if r.killed else "finished")
                ),
            )
        evs, _ = read_events(events)
        state_bytes = mirror.stat().st_size if mirror.exists() else 0
    finally:
        for p in (data, mirror, events, log):
            p.unlink(missing_ok=True)
    rows = [b for b in (phase_breakdown(r) for r in split_runs(evs)) if b is not None]
    med = {k: median([r[k] for r in rows]) for k in (*PHASES, "total")} if rows else {}
    return {
        "model": cfg.recovery_model,
        "batch": cfg.recovery_batch,
        "steps": cfg.recovery_steps,
        "crashes": result.crashes,
        "runs": len(result.runs),
        "finished": result.finished,
        "mirror_file_bytes": state_bytes,
        "resumes": rows,
        "median_s": med,
        "phases": list(PHASES),
    }


def run_standby_recovery(
    cfg: BenchConfig, key: MasterKey, key_path: Path, pm: Path, disk: Path, progress: Progress
) -> dict[str, Any]:
    """The time a SIGKILL costs: a standby pair, a cold restart, an encrypted disk checkpoint.

    The same job (``cfg.standby_model``) three ways, each kill costing the time
    from the kill to the end of the first step after it, less one step:

    - standby: ``plinius train --standby``, its trainer killed
      ``cfg.standby_kills`` times, each once a spare is ready;
    - cold restart: ``plinius train`` killed ``cfg.standby_cold_kills`` times
      and started again at once;
    - encrypted disk checkpoint: each cold restart with its mirror restore
      replaced by the load of an encrypted checkpoint of the same state, timed
      here (``torch.load`` of a decrypted file read back): an estimate, since
      the restart itself is the cold one (and a disk checkpoint is taken less
      often than every step, so the steps since it are lost too: not counted).
    """
    from ..data import seal_dataset
    from .crashtest import read_events, run_campaign
    from .standby import cold_lost_times, lost_times, run_standby_campaign, step_time, summary

    data = pm / "standby.pld"
    mirror, cold_mirror = pm / "standby.plm", pm / "standby-cold.plm"
    ev, cold_ev, log = disk / "standby.jsonl", disk / "standby-cold.jsonl", disk / "standby.log"
    seal_dataset(data, key, synthetic_mnist(max(256, cfg.recovery_batch * 16), seed=2))
    args = [
        "--key", str(key_path), "--data", str(data), "--model", cfg.standby_model,
        "--batch-size", str(cfg.recovery_batch), "--num-classes", "10",
        "--seed", "0", "--threads", "1",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONHASHSEED="0")
    n = cfg.standby_kills + cfg.standby_cold_kills
    try:
        with progress.section("standby", n + 1) as advance:
            camp = run_standby_campaign(
                [*args, "--mirror", str(mirror), "--steps", "1000000"],
                events_path=ev,
                log_path=log,
                plan=["trainer"] * cfg.standby_kills,
                stop_after=True,
                env=env,
                on_kill=lambda k: advance(f"standby kill after step {k.step}"),
            )
            steps = 40 + 10 * cfg.standby_cold_kills
            cold = run_campaign(
                [*args, "--mirror", str(cold_mirror), "--steps", str(steps)],
                events_path=cold_ev,
                log_path=log,
                crashes=cfg.standby_cold_kills,
                startup_kill_fraction=0.0,  # every kill while training, as the standby's
                env=env,
                total_steps=steps,
                on_run=lambda r: advance(f"cold run {r.index + 1}"),
            )
            cold_events, _ = read_events(cold_ev)
            ckpt_s = _checkpoint_load_s(key, disk, mirror)
            advance("checkpoint")
    finally:
        for p in (data, mirror, cold_mirror, ev, cold_ev, log):
            p.unlink(missing_ok=True)
    lost = lost_times(camp)
    cold_step = step_time(cold_events) or 0.0
    cold_lost = cold_lost_times(cold, cold_step)
    restores = [r.recovery_s for r in cold.runs if r.recovery_s and r.resumed_from is not None]
    restore = median(restores) if restores else 0.0
    return {
        "model": cfg.standby_model,
        "batch": cfg.recovery_batch,
        "step_s": lost[0]["step"] if lost else float("nan"),
        "standby_s": summary([x["lost"] for x in lost]),
        "standby_detect_s": summary([x["detect"] for x in lost]),
        "standby_resume_s": summary([x["resume"] for x in lost]),
        "cold_s": summary(cold_lost),
        "checkpoint_s": summary([x - restore + ckpt_s for x in cold_lost]),
        "checkpoint_load_s": ckpt_s,
        "mirror_restore_s": restore,
        "spare_memory": next(
            (e["memory"] for e in camp.events if e.get("event") == "standby_ready"), {}
        ),
    }


def _checkpoint_load_s(key: MasterKey, disk: Path, mirror: Path) -> float:
    """Median load of an encrypted disk checkpoint holding the mirror's committed tensors."""
    from ..mirror import Mirror
    from .baselines import encrypted_checkpoint_load, encrypted_checkpoint_save

    with Mirror(mirror, key, readonly=True) as m:
        state = m.read_tensors("")
    path = disk / "standby.ckpt"
    try:
        encrypted_checkpoint_save(state, path, key)
        times = [encrypted_checkpoint_load(path, key)[1].total for _ in range(3)]
    finally:
        path.unlink(missing_ok=True)
    return median(times)
