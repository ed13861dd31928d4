"""Replicas across machines: their cost per step, and the time a machine's loss costs.

Two torchrun jobs, each ``python -m plinius.bench.replicas`` in every process:

1. **compare** (one agent, 2 processes, one mirror directory): :func:`plinius.fit`
   in DDP on sealed synthetic MNIST-shaped data, round after round (the order
   rotating), each on a fresh model with the same seed: ``none`` (no mirror),
   ``mirror`` (a mirror set without replicas) and ``replicas`` (the same with
   ``replicas=1``). Only replication differs between the last two: its cost
   per step, and the bytes each process puts into the step gate's all-gathers
   (:attr:`plinius.FitResult.gate_bytes_sent`). A set spanning two machines
   without replicas is refused, so this baseline keeps both processes on one
   agent and one directory. Rank 0 then times an encrypted disk checkpoint
   of the same model and optimizer (:mod:`.baselines`: ``torch.save``,
   AES-256-GCM, fsync, rename; and reading it back).
2. **loss** (two agents standing for two machines: a c10d rendezvous on
   127.0.0.1, ``--nnodes=2 --nproc-per-node=1``, ``is_host`` on the first, each
   its own mirror directory, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``): the job
   trains with ``replicas=1``; once it runs, the second agent and its worker
   are SIGKILLed, its directory deleted, and a new agent started at once with
   an empty one, ``kills`` times. Each worker logs when it started, joined the
   group, opened its mirror set, restored, and ended each step; the time from
   the kill to the job's next step splits into torch's part (dead-node
   detection and the new rendezvous, up to the new workers' start), the
   workers' start-up (Python, torch, the model, the process group), plinius'
   part (``open_mirror_set``: the agreement and the seed sent from the
   survivor; the restore from it and the replica) and the first step.

Without replicas the usual practice is a restart of the whole job from an
encrypted disk checkpoint written every N steps: its time is computed from
what was measured (torch's part and the start-up as measured here, the
checkpoint's read, and N/2 steps redone on average at the measured step time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..crypto import MasterKey
from ._common import BenchConfig, Progress, median

__all__ = ["MODES", "RDZV_CONF", "agent_command", "loss_times", "main", "run_replicas"]

MODES = ("none", "mirror", "replicas")
# Dead-node detection takes keep_alive_interval * keep_alive_max_attempt (torch's
# default 5 s * 3); the section sets it to 1 s * 2 and says so in its report.
RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=2"


class _Log:
    """This worker's events, one JSON line each, flushed at once (a SIGKILL loses at most one)."""

    def __init__(self, out: Path) -> None:
        self._f = open(out / f"w-{os.getpid()}.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def __call__(self, ev: str, **fields: Any) -> None:
        self._f.write(json.dumps({"ev": ev, "t": time.time(), **fields}) + "\n")
        self._f.flush()


def _build(args: argparse.Namespace, steps: int) -> Callable[..., Any]:
    """A fresh model (the same seed every time) in DDP; the call trains it with ``fit``.

    Everything but the mirror is made here, before the mirror set is opened,
    as ``plinius train`` does: the restore is timed alone.
    """
    from ..data import SealedDataset
    from ..dist import wrap_ddp
    from ..models import build_model
    from ..train import fit, seed_everything

    seed_everything(0)
    spec = build_model(args.model, input_shape=(28, 28), num_classes=10)
    opt = spec.make_optimizer(None)
    sched = spec.make_scheduler(opt, steps)
    ddp = wrap_ddp(spec.module)
    ds = SealedDataset(args.data, args.key_obj)

    def train(mirror: Any, **kw: Any) -> Any:
        with ds:
            res = fit(
                ddp, opt, loss_fn=spec.loss, dataset=ds, batch_size=args.batch, steps=steps,
                seed=0, mirror=mirror, scheduler=sched, prepare=spec.prepare,
                split=spec.split, **kw,
            )  # fmt: skip
        return res, spec.module, opt

    return train


def _compare_once(args: argparse.Namespace, key: MasterKey, mode: str, tag: str) -> dict[str, Any]:
    """One ``fit`` of ``mode`` in this process (every process runs it together)."""
    import torch.distributed as dist

    from ..dist import open_mirror_set

    where = Path(args.pm) / f"repl-{tag}"
    train = _build(args, args.steps + 4)
    mirrors = (
        None if mode == "none" else open_mirror_set(where, key, replicas=int(mode == "replicas"))
    )
    try:
        res, module, opt = train(mirrors)
        info = mirrors.mirror.info() if mirrors is not None else None
        seal = _seal_times(mirrors, res.final_step) if mode == "replicas" else []
    finally:
        if mirrors is not None:
            mirrors.close()
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(where, ignore_errors=True)
    return {
        # The first three steps (warm-up, the first writes into each of the two
        # generations a set's file keeps) and the last (a synchronous save) left out.
        "step_s": list(res.step_times_s[3:-1]),
        "gate_bytes_per_step": res.gate_bytes_sent / max(1, res.steps_run),
        "tensor_bytes": None if info is None else info.tensor_bytes,
        "file_bytes": None if info is None else info.file_bytes,
        "seal_s": seal,
        "state": (module, opt),
    }


def _seal_times(mirrors: Any, step: int, n: int = 100) -> list[float]:
    """Seconds of sealing this process's replica (pack its own part, encrypt it), ``n`` times."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        mirrors.seal_own(step)
        out.append(time.perf_counter() - t0)
    return out


def _checkpoint_times(state: tuple[Any, Any], key: MasterKey, path: Path, repeats: int) -> Any:
    """Seconds to write and to read back an encrypted disk checkpoint of the model and optimizer."""
    from .baselines import encrypted_checkpoint_load, encrypted_checkpoint_save

    module, opt = state
    sd = {"model": module.state_dict(), "optimizer": opt.state_dict()}
    save, load = [], []
    try:
        for _ in range(repeats):
            save.append(encrypted_checkpoint_save(sd, path, key).total)
            load.append(encrypted_checkpoint_load(path, key)[1].total)
        size = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    return {"save_s": save, "load_s": load, "bytes": size}


def _compare(args: argparse.Namespace, key: MasterKey, rank: int) -> None:
    import torch.distributed as dist

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for rnd in range(args.rounds):
        for mode in MODES[rnd % 3 :] + MODES[: rnd % 3]:
            run = _compare_once(args, key, mode, f"{rnd}-{mode}")
            if mode != "mirror" or rnd < args.rounds - 1:
                del run["state"]  # only the last model and optimizer are checkpointed
            runs[mode].append(run)
    ckpt = None
    if rank == 0:
        ckpt = _checkpoint_times(runs["mirror"][-1]["state"], key, Path(args.ckpt), args.repeats)
    dist.barrier()
    if rank == 0:
        out = {
            m: {
                "step_s": [s for r in rs for s in r["step_s"]],
                "gate_bytes_per_step": median([r["gate_bytes_per_step"] for r in rs]),
                "tensor_bytes": rs[-1]["tensor_bytes"],
                "file_bytes": rs[-1]["file_bytes"],
                "seal_s": [x for r in rs for x in r["seal_s"]],
            }
            for m, rs in runs.items()
        }
        Path(args.out, "compare.json").write_text(json.dumps({"modes": out, "checkpoint": ckpt}))


def _loss(args: argparse.Namespace, key: MasterKey, log: _Log) -> None:
    """Train with replicas until stopped, logging each phase of a (re)start and every step."""
    from ..dist import open_mirror_set

    train = _build(args, args.steps)
    log("open_start")
    mirrors = open_mirror_set(args.pm, key, replicas=1)
    seed = mirrors.seed
    sent = None
    if seed is not None and seed.info().path:
        # What the survivor sent: the committed generation's bytes, written into a
        # file whose tail is a hole (its allocated blocks; tmpfs and most file systems).
        sent = os.stat(str(seed.info().path)).st_blocks * 512
    log("open_end", step=mirrors.step, seeded=seed is not None, seed_bytes=sent)
    with mirrors:
        train(
            mirrors,
            on_resume=lambda step, s: log("resumed", step=step, restore_s=s),
            callback=lambda ev: log("step", step=ev.step),
        )


def main(argv: list[str] | None = None) -> None:
    """The worker: run in every process of the torchrun jobs (see the module docstring)."""
    from ..job import process_age_s

    age = process_age_s()
    t_main = time.time()
    from .ddp import worker_parser

    p = worker_parser("python -m plinius.bench.replicas", 3)
    p.add_argument("--job", choices=["compare", "loss"], required=True)
    p.add_argument("--ckpt", default="")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import torch

    from ..dist import finish, init

    log = _Log(Path(args.out))
    torch.set_num_threads(args.threads)
    place = init()
    log(
        "init",
        started=t_main - (age or 0.0),
        main=t_main,
        rank=place.rank,
        restart=place.restart,
        pm=args.pm,
    )
    key = args.key_obj = MasterKey.load(args.key)
    if args.job == "compare":
        _compare(args, key, place.rank)
    else:
        _loss(args, key, log)
    finish(0)  # ends the worker (gloo's teardown at exit may abort it)


# ------------------------------------------------------------------ the orchestrator
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def agent_command(port: int, run_id: str, host: bool, restarts: int, args: list[str]) -> list[str]:
    """One agent of the 2-machine job (1 process), its c10d store on the host agent.

    ``is_host`` is said explicitly: both agents run on this host, and one left
    to guess would start a second store on the same port and split the rendezvous.
    """
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
        f"--max-restarts={restarts}", "--monitor-interval=0.1",
        f"--rdzv-conf=is_host={int(host)},{RDZV_CONF}", "-m", __name__, *args,
    ]  # fmt: skip


def _read(out: Path) -> dict[int, list[dict[str, Any]]]:
    """Every worker's events so far, by pid (a line cut by a SIGKILL is skipped)."""
    got: dict[int, list[dict[str, Any]]] = {}
    for f in out.glob("w-*.jsonl"):
        evs = []
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                evs.append(json.loads(line))
            except ValueError:
                continue
        got[int(f.stem[2:])] = evs
    return got


def _run_compare(
    cfg: BenchConfig, common: list[str], pm: Path, disk: Path, out: Path
) -> dict[str, Any]:
    from .multiproc import run_to_end, torchrun_command

    log = disk / "replicas-compare.log"
    args = [*common, "--job", "compare", "--pm", str(pm), "--out", str(out),
            "--ckpt", str(disk / "replicas.ckpt"), "--steps", str(cfg.replicas_steps),
            "--rounds", str(cfg.replicas_rounds),
            "--repeats", str(cfg.replicas_ckpt_repeats)]  # fmt: skip
    cmd = torchrun_command(2, 0, args, module=__name__)
    what = "the replicas benchmark's comparison job"
    run_to_end(cmd, log, cfg.replicas_timeout_s, what, out / "compare.json")
    log.unlink()
    raw: dict[str, Any] = json.loads((out / "compare.json").read_text())
    return raw


def _run_loss(
    cfg: BenchConfig,
    common: list[str],
    pm: Path,
    disk: Path,
    out: Path,
    advance: Callable[[str], None],
) -> tuple[list[float], dict[int, list[dict[str, Any]]]]:
    """The 2-agent job and its kills; returns the kill times and every worker's events."""
    from .multiproc import job_failure, stop_job

    port = _free_port()
    run_id = f"plinius-bench-{port}"
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    kills = cfg.replicas_kills
    gap, tail = cfg.replicas_gap_steps, cfg.replicas_tail_steps
    steps = (kills + 1) * (gap + 10) + tail + 1000  # never reached: the job is stopped

    def start(machine: str, host: bool) -> subprocess.Popen[bytes]:
        args = [*common, "--job", "loss", "--pm", str(pm / f"machine-{machine}"),
                "--out", str(out), "--steps", str(steps)]  # fmt: skip
        with open(disk / f"replicas-{machine}.log", "ab") as f:
            return subprocess.Popen(
                agent_command(port, run_id, host, kills + 1, args), stdout=f, stderr=f,
                env=env, start_new_session=True,
            )  # fmt: skip

    logs = [disk / "replicas-A.log", disk / "replicas-B.log"]
    agents = [start("A", True), start("B", False)]
    deadline = time.monotonic() + cfg.replicas_timeout_s
    old: set[int] = set()
    killed: list[float] = []
    try:
        while True:
            now = {p: e for p, e in _read(out).items() if p not in old}
            done = [sum(e["ev"] == "step" for e in evs) for evs in now.values()]
            if len(done) >= 2 and min(done) >= (gap if len(killed) < kills else tail):
                if len(killed) == kills:
                    break
                killed.append(time.time())  # machine B is lost: agent, worker, memory
                stop_job(agents[1])
                shutil.rmtree(pm / "machine-B", ignore_errors=True)
                agents[1] = start("B", False)
                old |= set(now)
                advance(f"machine loss {len(killed)}")
                continue
            if any(a.poll() is not None for a in agents):
                raise job_failure("the replicas benchmark's 2-agent job ended early", logs)
            if time.monotonic() > deadline:
                raise job_failure("the replicas benchmark's 2-agent job timed out", logs)
            time.sleep(0.02)
    finally:
        for a in agents:
            stop_job(a)
    for p in logs:
        p.unlink(missing_ok=True)
    return killed, _read(out)


def loss_times(kill: float, workers: list[list[dict[str, Any]]]) -> dict[str, Any] | None:
    """What one machine loss cost, from the events of the workers started after the kill.

    Returns:
        Seconds: ``torch`` (kill to the last new worker's process start:
        dead-node detection, the new rendezvous, the new agent's own start),
        ``startup`` (to the last ``open_mirror_set`` call: Python, torch, the
        model, the process group), ``open`` (the replaced machine's
        ``open_mirror_set``: agreement and seed), ``restore`` (its restore
        from the seed and its replica, and its own mirror's first save),
        ``first_step`` and ``total`` (kill to the end of the job's first step);
        the step resumed from, and the seed's bytes. ``None`` when a worker
        did not get that far.
    """

    names = ("init", "open_start", "open_end", "resumed", "step")
    firsts = [{n: next((e for e in w if e["ev"] == n), None) for n in names} for w in workers]
    if len(firsts) < 2 or any(v is None for f in firsts for v in f.values()):
        return None
    ev: list[dict[str, dict[str, Any]]] = firsts  # type: ignore[assignment]
    seeded = next((f for f in ev if f["open_end"]["seeded"]), None)
    if seeded is None:
        return None
    started = max(float(f["init"]["started"]) for f in ev)
    open_start = max(float(f["open_start"]["t"]) for f in ev)
    resumed = max(float(f["resumed"]["t"]) for f in ev)
    first = min(float(f["step"]["t"]) for f in ev)
    s_end, s_res = seeded["open_end"], seeded["resumed"]
    return {
        "torch": started - kill,
        "startup": open_start - started,
        "open": float(s_end["t"]) - float(seeded["open_start"]["t"]),
        "restore": float(s_res["t"]) - float(s_end["t"]),
        "plinius": resumed - open_start,
        "first_step": first - resumed,
        "total": first - kill,
        "resumed_from": s_res["step"],
        "seed_bytes": s_end["seed_bytes"],
    }


def _job_step_s(events: dict[int, list[dict[str, Any]]]) -> list[float]:
    """The 2-agent job's step times: gaps between consecutive steps of one worker."""
    out = []
    for evs in events.values():
        t = [float(e["t"]) for e in evs if e["ev"] == "step"]
        out += [b - a for a, b in itertools.pairwise(t[2:])]  # past the first steps
    return out


def run_replicas(
    cfg: BenchConfig, key: MasterKey, key_path: Path, pm: Path, disk: Path, progress: Progress
) -> dict[str, Any]:
    """The cost of replicas per step and the time a machine's loss costs, with and without.

    Args:
        cfg: The benchmark's settings (``replicas_*``).
        key: The master key.
        key_path: Its file (the workers load it).
        pm: The scratch PM directory (dataset, mirror sets).
        disk: The scratch disk directory (logs, the checkpoint).
        progress: The progress display.

    Returns:
        The section's results.
    """
    from ..data import seal_dataset
    from ..models import build_model
    from .overhead import synthetic_mnist

    data = pm / "replicas.pld"
    seal_dataset(data, key, synthetic_mnist(cfg.replicas_batch * 8))
    common = ["--key", str(key_path), "--data", str(data), "--model", cfg.replicas_model,
              "--batch", str(cfg.replicas_batch), "--threads", str(cfg.threads or 1)]  # fmt: skip
    out_c, out_l = disk / "replicas-compare", disk / "replicas-loss"
    sets = pm / "replicas-sets"
    try:
        for d in (out_c, out_l, sets):
            d.mkdir()
        with progress.section("replicas", 1 + cfg.replicas_kills) as advance:
            raw = _run_compare(cfg, common, pm, disk, out_c)
            advance("replicas vs none")
            killed, events = _run_loss(cfg, common, sets, disk, out_l, advance)
    finally:
        data.unlink(missing_ok=True)
        for d in (out_c, out_l, sets):
            shutil.rmtree(d, ignore_errors=True)
    modes = raw["modes"]
    step = {m: median(modes[m]["step_s"]) for m in MODES}
    # The workers of each incarnation: those started after a kill and before the next.
    bounds = [*killed, float("inf")]
    losses = []
    for i, k in enumerate(killed):
        ws = [
            evs
            for evs in events.values()
            if evs and evs[0]["ev"] == "init" and k < float(evs[0]["t"]) < bounds[i + 1]
        ]
        got = loss_times(k, ws)
        if got is not None:
            losses.append(got)
    ckpt = raw["checkpoint"]
    parts = {
        k: median([float(x[k]) for x in losses])
        for k in ("torch", "startup", "open", "restore", "plinius", "first_step", "total")
    }
    save_s, load_s = median(ckpt["save_s"]), median(ckpt["load_s"])
    baseline = []
    for n in cfg.replicas_ckpt_every:
        # Computed: the same rendezvous and start-up, the checkpoint read, N/2
        # steps redone on average and the first step, at the no-mirror step time.
        lost = parts["torch"] + parts["startup"] + load_s + (n / 2 + 1) * step["none"]
        baseline.append(
            {
                "every": n,
                "lost_s": lost,
                "vs_replicas": lost / parts["total"] if losses else float("nan"),
                "write_pct_per_step": 100.0 * save_s / n / step["none"],
            }
        )
    spec = build_model(cfg.replicas_model, input_shape=(28, 28), num_classes=10)
    rep_bytes = modes["replicas"]["gate_bytes_per_step"] - modes["mirror"]["gate_bytes_per_step"]
    return {
        "model": cfg.replicas_model,
        "batch": cfg.replicas_batch,
        "param_bytes": spec.param_bytes(),
        "rounds": cfg.replicas_rounds,
        "steps_per_round": cfg.replicas_steps,
        "rdzv_conf": RDZV_CONF,
        "iteration_s": step,
        "iteration_runs_s": {m: modes[m]["step_s"] for m in MODES},
        "replication_pct": 100.0 * (step["replicas"] / step["mirror"] - 1.0),
        "replicas_vs_none_pct": 100.0 * (step["replicas"] / step["none"] - 1.0),
        "two_agents_step_s": median(_job_step_s(events)),
        "gate_bytes_per_step": {m: modes[m]["gate_bytes_per_step"] for m in MODES},
        "replica_bytes_per_step": rep_bytes,
        "seal_s": median(modes["replicas"]["seal_s"]),
        "mirror_tensor_bytes": modes["replicas"]["tensor_bytes"],
        "mirror_file_bytes": modes["replicas"]["file_bytes"],
        "kills": len(killed),
        "losses": losses,
        "loss_s": parts,
        "checkpoint": {
            "save_s": save_s,
            "load_s": load_s,
            "bytes": ckpt["bytes"],
            "save_runs_s": ckpt["save_s"],
            "load_runs_s": ckpt["load_s"],
        },
        "baseline": baseline,
    }


if __name__ == "__main__":  # under torchrun: python -m plinius.bench.replicas
    main(sys.argv[1:])
