"""A user's own torchrun script: DDP, a mirror set and ``plinius.fit``; the tests run it.

    torchrun --standalone --nproc-per-node=N tests/distributed/worker.py \
        --mirror DIR --key K --out OUT

Rank 0 writes the job's result to ``OUT`` as JSON: every step's loss and a hash
of the final model and optimizer state of every process (gathered). Test hooks
(environment variables, for the worst moments):

* ``WORKER_SLOW_SAVE=K``: rank 0's save of step K waits 30 s before it writes.
* ``WORKER_DIE_AFTER_COMMIT=K:R``: rank R kills itself (SIGKILL) once it has
  committed step K.
  Both fire only in the first incarnation (``TORCHELASTIC_RESTART_COUNT`` 0).
* ``WORKER_WIPE_ON_DIE=1``: the process that dies (above) first deletes its
  machine's mirror directory (``--machine-per-process``: its own): the machine
  and its persistent memory are lost.
* ``WORKER_DIE_SEEDING=receiver|donor``: in the second incarnation, the
  process receiving a lost machine's mirror (or the one sending it) is killed
  (SIGKILL) in the middle of the transfer (at the body's broadcast).
* ``WORKER_TAMPER_SEED=flip|replay``: in the second incarnation, an attacker
  on the wire changes the mirror the survivor sends the lost machine: one
  byte flipped, or the survivor's mirror as it was at step 10 (copied then).
* ``WORKER_STEP_SLEEP=S``: every step sleeps S seconds after it is done (a
  slower job, for kills that must land mid-run).
* ``WORKER_PIDS=DIR``: each process writes its pid to ``DIR/<local rank>.pid``
  once its first step of this incarnation is done (training is under way).
* ``WORKER_TRACE=DIR``: each process appends JSON lines to ``DIR/<pid>.jsonl``,
  each with its incarnation (a time rank 0 draws at start), rank and world
  size: on resume the step and a digest of the model and optimizer restored;
  per step the record indices it fetched; per save the step, the job's loss
  and the digest. What the elastic tests check a trajectory with.
* ``WORKER_DIE_AFTER_ADVANCE=V``: with ``--counter``, the process that owns the
  counter kills itself (SIGKILL) as soon as it has advanced the counter to V,
  before it commits the step whose save advanced it (first incarnation only).

``--counter PATH`` protects the set with a (file) freshness counter, advanced
every ``--counter-every`` saves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

import plinius
from plinius import dist as pdist
from plinius.counters import FileCounter
from plinius.crypto import MasterKey


class Records(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Deterministic records: 16 features, 4 classes."""

    def __init__(self, n: int = 480) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 16, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.drawn: list[int] = []  # the indices fetched since the trace last took them

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.drawn.append(int(i))
        return self.x[i], self.y[i]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    )


def digest(module: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    for k, st in sorted(optimizer.state_dict()["state"].items()):
        for name, v in sorted(st.items()):
            h.update(f"{k}.{name}".encode())
            h.update(torch.as_tensor(v).contiguous().numpy().tobytes())
    return h.hexdigest()


class Trace:
    """``WORKER_TRACE``: JSON lines of what this process trained (see the module's doc).

    A step's indices are written when its batch is fetched (before the step's
    gradients are exchanged: a step any process committed was fetched by all),
    its loss and digest just before its save (a committed step is traced).
    """

    def __init__(self, data: Records, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        where = os.environ.get("WORKER_TRACE")
        self.path = Path(where, f"{os.getpid()}.jsonl") if where else None
        self.data, self.net, self.opt = data, net, opt
        self.head: dict[str, Any] = {}
        if self.path is not None:
            box = [time.time_ns()]
            dist.broadcast_object_list(box, src=0)  # one incarnation, one time: rank 0's
            self.head = {"inc": box[0], "rank": dist.get_rank(), "world": dist.get_world_size()}
        self.step = 0

    def write(self, **line: Any) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({**self.head, **line}) + "\n")

    def watch(self, mirrors: pdist.MirrorSet) -> None:
        """Trace each save of this process's mirror (the worker reaches inside)."""
        m = mirrors.mirror
        inner = m.save

        def save(state: dict[str, Any], *, step: int) -> None:
            loss = float(state["losses"][step - 1])
            self.write(saved=step, loss=loss, digest=digest(self.net, self.opt))
            inner(state, step=step)

        if self.path is not None:
            m.save = save  # type: ignore[method-assign]

    def resumed(self, step: int | None, _: float) -> None:
        self.data.drawn.clear()
        self.step = step or 0
        self.write(resumed=step, digest=digest(self.net, self.opt))

    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx, self.data.drawn[:] = list(self.data.drawn), []
        self.step += 1
        self.write(step=self.step, idx=idx)
        return batch[0], batch[-1]


def hooks(mirrors: pdist.MirrorSet, out: Path) -> Any:
    """The test hooks' step callback (and the slow save, installed here)."""
    first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    slow = int(os.environ.get("WORKER_SLOW_SAVE", "0"))
    die = os.environ.get("WORKER_DIE_AFTER_COMMIT", "")
    rank = mirrors.place.rank
    if first and slow and rank == 0:
        m = mirrors.mirror
        inner = m._save_locked  # the test reaches inside to stall one save

        def stalled(skeleton: Any, srcs: Any, step: int) -> None:
            if step == slow:
                time.sleep(30)
            inner(skeleton, srcs, step)

        m._save_locked = stalled  # type: ignore[method-assign]
    die_step, die_rank = (int(v) for v in die.split(":")) if die else (0, -1)
    pids = os.environ.get("WORKER_PIDS")
    nap = float(os.environ.get("WORKER_STEP_SLEEP", "0"))
    told = []

    def callback(ev: plinius.StepEvent) -> None:
        if pids and not told:
            Path(pids, f"{mirrors.place.local_rank}.pid").write_text(str(os.getpid()))
            told.append(True)
        if first and ev.step == 10 and rank == 0 and os.environ.get("WORKER_TAMPER_SEED"):
            mirrors.mirror.info()  # step 10 committed: the attacker copies the file now
            copy = mirrors.mirror.copy_committed()
            old = bytes(copy.buffer[: copy.nbytes]).ljust(copy.file_size, b"\0")
            out.with_suffix(".step10").write_bytes(old)
        if first and ev.step == die_step and rank == die_rank:
            mirrors.mirror.info()  # joins the pending save: step K is committed here
            if os.environ.get("WORKER_WIPE_ON_DIE"):
                shutil.rmtree(mirrors.path)
            os.kill(os.getpid(), signal.SIGKILL)
        if nap:
            time.sleep(nap)

    return callback


def die_while_seeding(who: str) -> None:
    """Install the ``WORKER_DIE_SEEDING`` hook (second incarnation only)."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "1":
        return
    inner_share, inner_broadcast = pdist._share_seed, dist.broadcast
    role: list[str] = []

    def share(mine: Any, key: Any, step: int, donor: int, out: Any) -> Any:
        role.append("donor" if dist.get_rank() == donor else "receiver" if out else "other")
        try:
            return inner_share(mine, key, step, donor, out)
        finally:
            role.clear()

    def broadcast(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # The body is the transfer's second broadcast (after the 2-number head).
        if role == [who] and tensor.numel() > 2:
            print(f"rank {dist.get_rank()} ({who}) dies while seeding", flush=True)
            if who == "receiver":
                work = inner_broadcast(tensor, *args, async_op=True, **kwargs)
                time.sleep(0.01)  # the transfer is under way
                del work
            os.kill(os.getpid(), signal.SIGKILL)
        return inner_broadcast(tensor, *args, **kwargs)

    pdist._share_seed = share  # type: ignore[assignment]
    dist.broadcast = broadcast  # type: ignore[assignment]


def tamper_seed(how: str, old: Path) -> None:
    """Install the ``WORKER_TAMPER_SEED`` hook (second incarnation only)."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "1":
        return
    inner = dist.broadcast

    def broadcast(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        work = inner(tensor, *args, **kwargs)
        received = dist.get_rank() != kwargs["src"]
        if received and tensor.dtype == torch.uint8 and tensor.numel() > 1024:  # the body
            if how == "flip":
                tensor[tensor.numel() // 3] ^= 1
            else:
                replayed = torch.frombuffer(bytearray(old.read_bytes()), dtype=torch.uint8)
                tensor.copy_(replayed[: tensor.numel()])
        return work

    dist.broadcast = broadcast  # type: ignore[assignment]


class DyingCounter(FileCounter):
    """A file counter whose owner dies once it reached ``die_at`` (the test hook above)."""

    def __init__(self, path: str, die_at: int) -> None:
        super().__init__(path)
        self.die_at = die_at

    def increment(self) -> int:
        value = super().increment()
        if value == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return value


def counter_of(path: str | None) -> FileCounter | None:
    if path is None:
        return None
    first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    die = int(os.environ.get("WORKER_DIE_AFTER_ADVANCE", "0"))
    return DyingCounter(path, die) if first and die else FileCounter(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mirror", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--sync", action="store_true", help="synchronous saves")
    ap.add_argument("--ordered", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--replicas", type=int, default=0)
    ap.add_argument("--elastic", action="store_true", help="open the set elastic")
    ap.add_argument("--counter", default=None, help="a freshness counter file for the set")
    ap.add_argument("--counter-every", type=int, default=1)
    ap.add_argument(
        "--machine-per-process",
        action="store_true",
        help="each process keeps its own mirror directory (stands for its own machine)",
    )
    args = ap.parse_args()
    place = pdist.init()
    if os.environ.get("WORKER_TAMPER_SEED"):
        tamper_seed(os.environ["WORKER_TAMPER_SEED"], Path(args.out).with_suffix(".step10"))
    if os.environ.get("WORKER_DIE_SEEDING"):
        die_while_seeding(os.environ["WORKER_DIE_SEEDING"])
    key = MasterKey.load(args.key)
    net = model()
    ordered = {"auto": None, "yes": True, "no": False}[args.ordered]
    ddp = pdist.wrap_ddp(net, ordered=ordered)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    where = Path(args.mirror)
    if args.machine_per_process:
        where = where / f"machine-{place.local_rank}"
    data = Records()
    trace = Trace(data, net, opt)
    counter = counter_of(args.counter)
    with pdist.open_mirror_set(
        where,
        key,
        replicas=args.replicas,
        elastic=args.elastic,
        counter=counter,
        counter_every=args.counter_every,
    ) as mirrors:
        trace.watch(mirrors)
        res = plinius.fit(
            ddp,
            opt,
            loss_fn=nn.functional.cross_entropy,
            dataset=data,
            batch_size=args.batch_size,
            steps=args.steps,
            seed=7,
            mirror=mirrors,
            scheduler=sched,
            async_save=not args.sync,
            callback=hooks(mirrors, Path(args.out)),
            on_resume=trace.resumed,
            split=trace.split,
        )
    digests: list[Any] = [None] * place.world_size
    dist.all_gather_object(digests, digest(net, opt))
    if place.rank == 0:
        out = {"losses": res.losses, "digests": digests, "resumed_from": res.resumed_from}
        Path(args.out).write_text(json.dumps(out))
    pdist.finish(0)


if __name__ == "__main__":
    sys.exit(main())
