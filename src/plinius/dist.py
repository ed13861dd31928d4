"""Multi-process training under ``torchrun``: one mirror per process, a global commit.

::

    # torchrun --standalone --nproc-per-node=2 train.py
    place = plinius.dist.init()                 # the process group (gloo on CPU)
    model = plinius.dist.wrap_ddp(model)        # DDP whose gradient sums are exact on resume
    with plinius.dist.open_mirror_set("/dev/shm/job.plm", key) as mirrors:
        plinius.fit(model, optimizer, mirror=mirrors, batch_size=64, ...)

**Files.** The mirror set at ``PATH`` is a directory; each process mirrors its
own state to ``PATH/local-<LOCAL_RANK>.plm`` (one directory per machine: the
machine's persistent memory). ``LOCAL_RANK``, not ``RANK``: torchrun keeps the
first stable across restarts on a machine, not the second.

**Global commit.** A step is committed only once every process committed it.
Each process's mirror keeps its previous generation (``keep_previous``), and a
process starts saving step *k+1* only once every process has committed step *k*
(:class:`plinius.fit` learns it from one tiny all-gather per step, which also
carries the step's loss). So after any crash the processes are at most one save
apart, and each still holds the newest step all of them hold. On start they
agree on it (:func:`open_mirror_set`, one all-gather) and those ahead go back to
it: one commit-word store each. A set whose files disagree in a way no crash
can produce (another job's file, a swapped or rolled-back file, a missing one)
is refused, naming the file; nothing is overwritten.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .counters import Counter
from .crypto import MasterKey
from .errors import ConfigError, IntegrityError, PliniusError, RollbackError
from .mirror import Mirror, MirrorInfo, SetFreshness, TensorInfo
from .replica import BLOB_OVERHEAD, UniquePart, open_sealed, seal

__all__ = [
    "MirrorSet",
    "Place",
    "SetMember",
    "SetView",
    "StepGate",
    "check_set_counter",
    "describe_set",
    "finish",
    "init",
    "member_files",
    "member_path",
    "open_mirror_set",
    "ordered_allreduce_hook",
    "wrap_ddp",
]

_MEMBER = re.compile(r"^local-(\d+)\.plm$")


@dataclass(frozen=True)
class Place:
    """Where this process stands in a torchrun job (from torchrun's environment).

    Attributes:
        rank: the global rank (``RANK``; not stable across elastic restarts).
        world_size: the number of processes (``WORLD_SIZE``).
        local_rank: the rank on this machine (``LOCAL_RANK``; names the file).
        local_world_size: the processes on this machine (``LOCAL_WORLD_SIZE``).
        node: this machine's rank in the rendezvous (``GROUP_RANK``).
        restart: how many times torchrun restarted the workers
            (``TORCHELASTIC_RESTART_COUNT``).
        run_id: the rendezvous run id (``TORCHELASTIC_RUN_ID``).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: int
    restart: int
    run_id: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Place | None:
        """This process's place, or ``None`` when it was not started by torchrun.

        Raises:
            ConfigError: torchrun's variables are there but not numbers.
        """
        env = os.environ if env is None else env
        if "LOCAL_RANK" not in env or "WORLD_SIZE" not in env:
            return None
        try:
            world = int(env["WORLD_SIZE"])
            local_world = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
            place = cls(
                rank=int(env.get("RANK", env["LOCAL_RANK"])),
                world_size=world,
                local_rank=int(env["LOCAL_RANK"]),
                local_world_size=local_world,
                node=int(env.get("GROUP_RANK", "0")),
                restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
                run_id=env.get("TORCHELASTIC_RUN_ID", ""),
            )
        except ValueError as exc:
            raise ConfigError(
                f"torchrun's environment is not understood ({exc}); start the job with torchrun"
            ) from exc
        if not (0 <= place.rank < world and 0 <= place.local_rank < local_world <= world):
            raise ConfigError(
                f"torchrun's environment is inconsistent (RANK={place.rank}, LOCAL_RANK="
                f"{place.local_rank}, WORLD_SIZE={world}); start the job with torchrun"
            )
        return place


def init(backend: str | None = None) -> Place:
    """Join the job's process group (gloo on CPU, nccl where CUDA is) and return this place.

    Idempotent: a group already initialised is kept.

    Raises:
        ConfigError: the process was not started by torchrun; or the job spans
            several machines whose agents share their store with the workers
            (start them with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``).
    """
    place = Place.from_env()
    if place is None:
        raise ConfigError(
            "not started by torchrun (LOCAL_RANK and WORLD_SIZE are not set); run the script "
            "with torchrun --nproc-per-node=N"
        )
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        from torch.distributed import PrefixStore  # type: ignore[attr-defined]
        from torch.distributed.rendezvous import rendezvous

        shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        machines = place.world_size // place.local_world_size
        if shared and machines > 1:
            # torch 2.13's agents, sharing their store, never let a machine that
            # replaces a lost one (or joins) complete the rendezvous: the rank-0
            # agent publishes the store's address in the first round only. And
            # the per-restart prefix below would differ between machines whose
            # agents restarted a different number of times: a hang, not an error.
            exc = ConfigError(
                f"this job spans {machines} machines and torchrun shares its agents' store "
                "with the workers, with which a machine that replaces a lost one never "
                "joins: start every torchrun agent with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
            )
            exc.reported_by = 0  # type: ignore[attr-defined]
            raise exc
        store, rank, world = next(rendezvous("env://"))
        if shared:
            # The shared store outlives a restart: a restarted group would read
            # the dead incarnation's addresses from it and fail to connect
            # (pytorch issues 135712, 167288). A key prefix per restart keeps each
            # incarnation's keys apart (on one machine every worker restarts
            # together, so all agree on the count). Unshared, every rendezvous
            # round starts a fresh store on rank 0: nothing stale to avoid.
            store = PrefixStore(f"plinius/restart-{place.restart}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return place


def finish(code: int = 0) -> NoReturn:
    """Leave the job's process group and end this process at once, with ``code``.

    Call it last, once every file is closed. Gloo keeps C++ worker threads whose
    teardown during the interpreter's own exit can abort a finished process
    ("terminate called without an active exception", SIGABRT; pytorch PR 179291),
    and torchrun then counts a worker that did all its work as failed. So the
    group is destroyed, the output flushed, and the interpreter's teardown skipped.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)


def ordered_allreduce_hook(group: Any, bucket: Any) -> torch.futures.Future[Tensor]:
    """A DDP comm hook whose sums do not depend on the bucket layout.

    DDP rebuilds its gradient buckets after the first iteration, so a resumed
    process reduces its first step in another layout than the run that never
    stopped; a ring all-reduce over 3 or more processes then adds in another
    order, and the result differs in the last bits. This hook all-gathers each
    bucket and adds the processes' gradients in rank order, element by element:
    the same sum whatever the layout. It moves ``world_size`` times the bucket
    instead of about twice (measured in ``plinius bench``'s DDP section).
    """
    grads = bucket.buffer()
    world = dist.get_world_size(group)
    parts = [torch.empty_like(grads) for _ in range(world)]
    fut = dist.all_gather(parts, grads, group=group, async_op=True).get_future()  # type: ignore[union-attr]

    def add_in_rank_order(_: torch.futures.Future[Any]) -> Tensor:
        total = parts[0].clone()
        for p in parts[1:]:
            total.add_(p)
        return total.div_(world)

    out: torch.futures.Future[Tensor] = fut.then(add_in_rank_order)
    return out


# DDP checks a hook's annotations as objects; this module's are strings (PEP 563).
ordered_allreduce_hook.__annotations__.update(
    bucket=dist.GradBucket,  # type: ignore[attr-defined]
    group=Any,
    **{"return": torch.futures.Future[torch.Tensor]},
)


def wrap_ddp(model: nn.Module, *, ordered: bool | None = None, **ddp_kwargs: Any) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel, exact on resume.

    Args:
        model: the module (on this process's device).
        ordered: reduce gradients with :func:`ordered_allreduce_hook`. ``None``
            (the default) does so with 3 or more processes, where the ring's
            order depends on the bucket layout; with 2, every order adds a+b.
        ddp_kwargs: passed to DDP.

    Returns:
        The DDP module (its ``.module`` is ``model``).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_initialized():
        raise ConfigError("wrap_ddp needs the process group: call plinius.dist.init() first")
    ddp = DDP(model, **ddp_kwargs)
    if ordered is None:
        ordered = dist.get_world_size() >= 3
    if ordered:
        ddp.register_comm_hook(None, ordered_allreduce_hook)
    return ddp


def member_path(base: str | os.PathLike[str], local_rank: int) -> Path:
    """The file of the process with ``local_rank`` in the mirror set at ``base``."""
    return Path(base) / f"local-{local_rank}.plm"


@dataclass(frozen=True)
class SetMember:
    """One file of a mirror set, as :func:`describe_set` reads it.

    Attributes:
        path: the file.
        local_rank: the place its name gives.
        generation: its committed generation (-1: the file is missing).
        held: the steps it can restore, committed first (``None``: nothing
            saved; see :meth:`~plinius.mirror.Mirror.held_steps`); empty when missing.
        identity: the set identity its state records (job, world size, place),
            or ``None`` when nothing was saved.
        counters: the set's freshness-counter value each held step expects,
            as ``held`` (``None``: written without a counter).
    """

    path: Path
    local_rank: int
    generation: int
    held: tuple[int | None, ...]
    identity: dict[str, Any] | None
    counters: tuple[int | None, ...] = ()

    @property
    def step(self) -> int | None:
        """The committed step (``None``: nothing saved, or missing)."""
        return self.held[0] if self.held else None


class MirrorSet:
    """This process's part of a mirror set: its own :class:`~plinius.mirror.Mirror` and its place.

    Made by :func:`open_mirror_set`; give it to :func:`plinius.fit` as ``mirror``.

    Attributes:
        mirror: this process's mirror (``keep_previous``).
        path: the set's directory.
        place: this process's place.
        identity: what every save records about the set (its job id, the
            world size, this process's local rank and node).
        step: the newest step every process holds (``None``: a new job), to
            which this process's mirror was brought.
        replicas: 1 when every process keeps the sealed replicas of every
            process's own part (see :mod:`plinius.replica`), else 0.
        seed: a read-only copy of a surviving process's mirror at ``step``
            when this process's machine lost its mirrors (``None`` otherwise):
            :meth:`restore` reads it, :meth:`settle` saves this process's own
            mirror from it.
        resized: the job resumes ``step`` in another world than wrote it (or
            with processes seeded without replicas; ``open_mirror_set(...,
            elastic=True)``): :meth:`restore` re-seeds the generators.
        stale: files of this machine's local ranks the job no longer has,
            removed by :meth:`drop_stale` once the new world committed a step.
    """

    def __init__(
        self,
        mirror: Mirror,
        path: Path,
        place: Place,
        identity: dict[str, Any],
        step: int | None,
        *,
        key: MasterKey | None = None,
        replicas: int = 0,
        seed: Mirror | None = None,
        seed_path: Path | None = None,
        resized: bool = False,
        stale: list[Path] | None = None,
    ) -> None:
        self.mirror = mirror
        self.path = path
        self.place = place
        self.identity = identity
        self.step = step
        self.replicas = replicas
        self.seed = seed
        self._seed_path = seed_path
        self._key = key
        self._part: UniquePart | None = None
        self.resized = resized
        self.stale = list(stale or [])

    @property
    def reader(self) -> Mirror:
        """The mirror a restore reads: the seed after a machine loss, else this process's own."""
        return self.seed if self.seed is not None else self.mirror

    def attach(self, module: nn.Module) -> tuple[int, int]:
        """Learn the model whose buffers the replicas carry; return the replicas' shape.

        Returns:
            ``(world size, bytes per replica blob)``: the shape of the
            ``replicas`` tensor in the mirrored state.
        """
        self._part = UniquePart(module)
        return (self.place.world_size, self._part.size + BLOB_OVERHEAD)

    def seal_own(self, step: int) -> bytes:
        """This process's own part, now, sealed as its replica at ``step``."""
        assert self._part is not None and self._key is not None, "attach() first"
        job = str(self.identity["job"])
        return seal(self._key, job, dist.get_rank(), step, self._part.layout, self._part.pack())

    def restore(self, state: dict[str, Any]) -> int | None:
        """Restore ``state`` at the set's step; then this rank's own part from its replica.

        The replica overlaid is the one of the rank this process has now (torchrun
        may give a machine another rank after a restart), so every process takes
        on the generators and buffers of the rank whose share of the data it trains.

        Raises:
            IntegrityError: a file, or the replica, fails authentication.
        """
        if self.resized:
            return self._restore_resized(state)
        got = self.reader.restore(state)
        if got is None or not self.replicas:
            return got
        assert self._part is not None and self._key is not None, "attach() first"
        rank = dist.get_rank()
        blob = bytes(state["replicas"][rank].numpy().tobytes())
        where = self._seed_path or member_path(self.path, self.place.local_rank)
        label = f"the replica of rank {rank} kept in {where} (step {got})"
        plain = open_sealed(
            self._key, str(self.identity["job"]), rank, got, self._part.layout, blob, label
        )
        self._part.unpack(plain)
        return got

    def _restore_resized(self, state: dict[str, Any]) -> int | None:
        """Restore a step written by another world; re-seed this process's generators.

        The saved ``replicas`` (if any) are of the old world's ranks: restored
        into a scratch tensor of their shape and left there, ``state`` keeps its own.
        """
        saved = [t for t in self.reader.committed_tensors() if t.name == "replicas"]
        mine = state.get("replicas")
        if saved:
            state["replicas"] = torch.zeros(saved[0].shape, dtype=torch.uint8)
        else:
            state.pop("replicas", None)
        try:
            got = self.reader.restore(state)
        finally:
            if mine is not None:
                state["replicas"] = mine  # in its place when the saved state had one too
            else:
                state.pop("replicas", None)
        if got is not None:
            _reseed(str(self.identity["job"]), got, self.place.rank, self.place.world_size)
        return got

    def drop_stale(self) -> None:
        """Remove the files of local ranks the job no longer has (after the new world's commit)."""
        for p in self.stale:
            p.unlink(missing_ok=True)
        self.stale = []

    def settle(self, state: dict[str, Any]) -> None:
        """After a restore from a seed: save this process's own mirror at the step, at once."""
        if self.seed is None:
            return
        assert self.step is not None
        self.mirror.save(state, step=self.step)
        self._drop_seed()

    def _drop_seed(self) -> None:
        if self.seed is not None:
            self.seed.close()
            self.seed = None
        if self._seed_path is not None:
            self._seed_path.unlink(missing_ok=True)
            self._seed_path = None

    def close(self) -> None:
        """Close this process's mirror (waiting for a pending save)."""
        self._drop_seed()
        self.mirror.close()

    def __enter__(self) -> MirrorSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self._drop_seed()
        self.mirror.__exit__(*exc)

    def __repr__(self) -> str:
        return f"MirrorSet({str(self.path)!r}, local_rank={self.place.local_rank})"


class StepGate:
    """The one small collective of each step of a multi-process :func:`plinius.fit`.

    Every process all-gathers two numbers: its loss and the last step it
    committed. From them each process computes the job's loss (the processes'
    losses added in rank order: the same value everywhere) and learns that
    every process committed what it did, the condition for its next save to
    reuse the slots of the step before. :meth:`start` runs the gather in the
    background (while the optimizer steps); :meth:`finish` waits for it.

    With replicas, a step that will be saved carries each process's sealed
    replica blob too (all of the same size): after :meth:`finish`, ``blobs``
    holds every process's, in rank order, for the save to keep.

    Attributes:
        module: the model inside DDP (what is mirrored).
        rank: this process's rank.
        world_size: the number of processes.
    """

    def __init__(self, module: nn.Module, rank: int, world_size: int) -> None:
        self.module = module
        self.rank = rank
        self.world_size = world_size
        self._mine = torch.zeros(16, dtype=torch.uint8)
        self._parts = [torch.zeros(16, dtype=torch.uint8) for _ in range(world_size)]
        self._work: Any = None
        self.blobs: Tensor | None = None
        self.bytes_sent = 0  # this process's bytes put into the gathers (bench)

    @classmethod
    def for_job(cls, model: nn.Module, mirror: object, batch_size: int) -> StepGate | None:
        """The gate of a job under a process group of several processes, else ``None``.

        Raises:
            ConfigError: the model is not wrapped in DDP, the mirror is not a
                :class:`MirrorSet`, or the batch does not divide by the processes.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        world = dist.get_world_size()
        if not isinstance(model, DDP):
            raise ConfigError(
                f"this job runs in {world} processes: wrap the model in "
                "DistributedDataParallel (plinius.dist.wrap_ddp(model)), or every process "
                "trains its own copy"
            )
        if mirror is not None and not isinstance(mirror, MirrorSet):
            raise ConfigError(
                f"this job runs in {world} processes: open the mirror with "
                "plinius.dist.open_mirror_set(path, key), so that each process mirrors its "
                "own state and the job resumes where every process committed"
            )
        if batch_size % world:
            raise ConfigError(
                f"the batch size {batch_size} (the whole job's) does not divide by the {world} "
                f"processes; use a multiple of {world}"
            )
        module = model.module
        assert isinstance(module, nn.Module)
        return cls(module, dist.get_rank(), world)

    def start(self, loss: float, committed: int, blob: bytes | None = None) -> None:
        """Start gathering this step's loss, this process's last committed step (and replica).

        Args:
            blob: this process's sealed replica, on a step every process will
                save (each knows which: the same ``mirror_every``); ``None`` else.
        """
        size = 16 + (len(blob) if blob is not None else 0)
        if self._mine.numel() != size:
            self._mine = torch.empty(size, dtype=torch.uint8)
            self._parts = [torch.empty(size, dtype=torch.uint8) for _ in range(self.world_size)]
        head = struct.pack("<dq", loss, committed)
        self._mine[:16] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        if blob is not None:
            self._mine[16:] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        self.bytes_sent += size
        self._work = dist.all_gather(self._parts, self._mine, async_op=True)

    def finish(self, committed: int) -> float:
        """Wait for the gather; return the job's loss for the step.

        Raises:
            IntegrityError: a process has not committed what this one did (the
                processes' saves are out of step).
        """
        self._work.wait()
        self._work = None
        total = 0.0
        self.blobs = torch.stack([p[16:] for p in self._parts]) if self._mine.numel() > 16 else None
        for r, part in enumerate(self._parts):
            loss, theirs = struct.unpack("<dq", part[:16].numpy().tobytes())
            total += loss  # in rank order: the same sum on every process
            if int(theirs) < committed:
                raise IntegrityError(
                    f"process {r} committed only step {int(theirs)}, this one step {committed}: "
                    "the processes' saves are out of step (the same --mirror-every on every "
                    "process?); restart the job"
                )
        return total / self.world_size


def _describe(path: Path, local_rank: int, m: Mirror) -> SetMember:
    ident = m.committed_value("dist")
    return SetMember(
        path,
        local_rank,
        m.info().generation,
        tuple(m.held_steps()),
        ident if isinstance(ident, dict) else None,
        tuple(m.held_counter_values()),
    )


def _held_text(held: tuple[int | None, ...]) -> str:
    if not held:
        return "missing"
    words = ["nothing" if h is None else f"step {h}" for h in held]
    return words[0] + (f" (and {words[1]})" if len(words) > 1 else "")


def _order(step: int | None) -> int:
    return -1 if step is None else step


def agree(
    members: list[SetMember], world_size: int, where: Path, *, elastic: bool = False
) -> int | None:
    """The newest step every member holds; refuse a set that no crash can produce.

    Args:
        members: every process's file, in local-rank order (``generation`` -1
            for a missing file).
        world_size: the number of processes now.
        where: the set's directory (for messages).
        elastic: the job may have another number of processes than wrote the
            set: the world size is not checked, and only the files that hold a
            saved step count (the others' processes are seeded from them).

    Returns:
        The step to resume from (``None``: nothing to resume).

    Raises:
        ConfigError: the set was written by another number of processes.
        IntegrityError: a file belongs to another job or another process.
        RollbackError: a file is missing, or further behind the others than a
            crash can leave it.
    """
    saved = [s for s in members if s.identity is not None]
    for s in saved:
        ident = s.identity or {}
        if ident.get("world_size") != world_size and not elastic:
            raise ConfigError(
                f"the mirror set {where} was written by {ident.get('world_size')} processes, "
                f"this job has {world_size}: run with that many processes, let the job change "
                "size (open_mirror_set(..., elastic=True)), or use a new --mirror"
            )
        if ident.get("local_rank") != s.local_rank:
            raise IntegrityError(
                f"{s.path} holds the state of process local-{ident.get('local_rank')}, "
                f"not local-{s.local_rank}: the set's files were swapped or copied; put each "
                "file back in its place"
            )
    if saved:
        first = _job(saved[0])
        odd = [s for s in saved if _job(s) != first]
        if odd:
            raise IntegrityError(
                f"the mirror set {where} mixes jobs: {', '.join(str(s.path) for s in odd)} "
                f"belong(s) to another job than {saved[0].path}; put back the set's own files, "
                "or start a new job with a new --mirror"
            )
    missing = [s for s in members if s.generation < 0]
    if missing and saved and not elastic:
        states = "; ".join(f"{s.path.name}: {_held_text(s.held)}" for s in members)
        raise RollbackError(
            f"{', '.join(str(s.path) for s in missing)} of the mirror set {where} is missing "
            f"while others hold saved steps ({states}); put the file back, or start a new job "
            "with a new --mirror (plinius rm the set)"
        )
    present = saved if elastic else [s for s in members if s.generation >= 0]
    if not present:
        return None
    target = min((s.step for s in present), key=_order)
    for s in present:
        if target not in s.held:
            behind = [b for b in present if b.step == target]
            states = "; ".join(f"{b.path.name}: {_held_text(b.held)}" for b in members)
            raise RollbackError(
                f"the files of the mirror set {where} are further apart than a crash leaves "
                f"them ({states}): {', '.join(str(b.path) for b in behind)} was rolled back "
                "or replaced by an older copy; put back the newest files, or start a new job "
                "with a new --mirror"
            )
    return target


def _job(s: SetMember) -> str:
    return str(s.identity["job"]) if s.identity is not None else ""


def open_mirror_set(
    base: str | os.PathLike[str],
    key: MasterKey,
    *,
    threads: int | None = None,
    replicas: int = 0,
    elastic: bool = False,
    counter: Counter | None = None,
    counter_every: int = 1,
) -> MirrorSet:
    """Open this process's mirror of the set at ``base``; agree with the others where to resume.

    Every process of the job calls it (it runs a few small collectives). Each
    checks its own file; all exchange what they hold; every file is checked
    against the others (one job, one world size, each file in its place, none
    missing, none further behind than a crash leaves it); the processes ahead
    of the newest common step go back to it. Only then is a missing file of a
    new set created.

    Each machine keeps its own directory at ``base`` (its persistent memory)
    with the files of its processes. With ``replicas=1`` every saved step also
    keeps every process's sealed replica (:mod:`plinius.replica`): a machine
    whose directory comes back empty (the machine was lost and replaced) is
    seeded from a surviving process's mirror at the agreed step, sent over the
    process group, and its processes take their own part from their replicas.

    With ``elastic=True`` the job may go on with another number of processes
    than wrote the set (torchrun ``--nnodes=MIN:MAX`` after a machine's loss
    or arrival). The step is the newest one every process that holds a saved
    step holds (those ahead go back to it); files of local ranks this machine
    no longer has are ignored, and removed once the new world committed a step
    (:meth:`MirrorSet.drop_stale`); processes with nothing saved (a machine
    that joined, or lost its directory) are seeded from the lowest-rank
    survivor's mirror. The model, optimizer, scheduler and sampler (a global
    sample cursor) are restored from that step; what only one process held
    cannot be mapped onto another world, so :meth:`MirrorSet.restore` re-seeds
    every process's random generators from ``(job, step, rank, world size)``
    and each process keeps the module buffers of the mirror it restored (its
    own, or the donor's). The change is recorded in the set's identity
    (``world_changes``). The same happens in a world of the same size when a
    process has nothing saved and replicas cannot restore it exactly.

    Args:
        base: the set's directory (``--mirror``) on this machine; created if missing.
        key: the master key.
        threads: encryption threads per process.
        replicas: 1 to keep the replicas (needed for a set across machines unless
            ``elastic``), 0 not to.
        elastic: accept another number of processes than wrote the set (above).
        counter: the set's trusted freshness counter (:mod:`plinius.counters`),
            the same on every process: one counter protects the whole set
            (:func:`check_set_counter`). The process of rank 0 owns it (reads
            and advances it, once per saved step, off the training's critical
            path); the others never touch it. ``None``: freshness unprotected.
        counter_every: advance the counter every this many saves (a TPM wears).

    Returns:
        This process's :class:`MirrorSet`; ``step`` is where the job resumes.

    Raises:
        ConfigError: not under an initialised process group; ``base`` is a
            single-process mirror file; another number of processes wrote the
            set (without ``elastic``); several machines without replicas (nor
            ``elastic``).
        IntegrityError, RollbackError: the set's files disagree (see :func:`agree`),
            or a file fails authentication; or they are older than the counter
            allows (:func:`check_set_counter`).
    """
    if not dist.is_initialized():
        raise ConfigError(
            "a mirror set needs the job's process group: call plinius.dist.init() first"
        )
    place = Place.from_env()
    if place is None:
        raise ConfigError("a mirror set needs torchrun's environment (LOCAL_RANK, WORLD_SIZE)")
    if replicas not in (0, 1):
        raise ConfigError(f"replicas must be 0 or 1, not {replicas!r}")
    where = Path(base)
    if where.exists() and not where.is_dir():
        raise ConfigError(
            f"{where} is a single-process mirror file; a torchrun job keeps a mirror set (a "
            "directory): use another --mirror path"
        )
    path = member_path(where, place.local_rank)
    fresh = _member_freshness(counter, counter_every, place.rank == 0, path)
    mine: Mirror | None = None
    error: PliniusError | None = None
    stale: list[Path] = []
    report: dict[str, Any] = {
        "local_rank": place.local_rank,
        "generation": -1,
        "held": (),
        "path": str(path),
        # A machine is its host and its directory (two agents on one host
        # standing for two machines keep two directories).
        "machine": f"{socket.gethostname()}:{os.path.realpath(where)}",
    }
    try:
        report.update(_counter_report(counter, place.rank == 0))
        if path.exists():
            mine = Mirror(path, key, threads=threads, keep_previous=True, set_freshness=fresh)
            d = _describe(path, place.local_rank, mine)
            report.update(
                generation=d.generation, held=d.held, identity=d.identity, counters=d.counters
            )
        if place.local_rank == 0 and where.is_dir():
            extra = _extra_members(where, place.local_world_size)
            if elastic:
                stale, extra = [where / name for name in extra], []
            if extra:
                raise ConfigError(
                    f"the mirror set {where} has files of more processes than this job's "
                    f"{place.local_world_size} ({', '.join(extra)}): run with as many processes "
                    "as wrote it, let the job change size (open_mirror_set(..., elastic=True)), "
                    "or use a new --mirror"
                )
    except PliniusError as exc:
        error = exc
    report["rank"] = place.rank
    report["error"] = None if error is None else (type(error).__name__, str(error))
    reports: list[dict[str, Any]] = [{} for _ in range(place.world_size)]
    dist.all_gather_object(reports, report)
    seed: Mirror | None = None
    seed_path: Path | None = None
    try:
        # Every process raises the first error any of them saw (so none waits
        # alone), marked with the rank that saw it: that one reports it.
        seen = next((r for r in reports if r["error"] is not None), None)
        if seen is not None:
            raise _peer_error(seen["rank"], *seen["error"]) from error
        members = [
            SetMember(
                Path(r["path"]),
                r["local_rank"],
                r["generation"],
                tuple(r["held"]),
                r.get("identity"),
                tuple(r.get("counters", ())),
            )
            for r in reports
        ]
        machine = [str(r["machine"]) for r in reports]
        try:
            step, lost, resized = _agree_machines(
                members, machine, place.world_size, where, replicas, elastic
            )
        except PliniusError as exc:
            # Every process finds the same from the same reports: rank 0 says it.
            exc.reported_by = 0  # type: ignore[attr-defined]
            raise
        job = next((s.identity["job"] for s in members if s.identity is not None), None)
        if job is None:
            # A new set: one id for the job, drawn by rank 0 and shared.
            box = [os.urandom(8).hex() if place.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            job = box[0]
        i_am_lost = place.rank in lost
        if mine is None:
            where.mkdir(parents=True, exist_ok=True)
            mine = Mirror(path, key, threads=threads, keep_previous=True, set_freshness=fresh)
        elif not i_am_lost and mine.held_steps()[0] != step:
            mine.go_back()  # ahead of the others: the newest common step is the previous one
        donor = min((r for r in range(place.world_size) if r not in lost), default=0)
        if lost and step is not None:
            seed_path = where / f".seed-local-{place.local_rank}.plm"
            seed = _share_seed(mine, key, step, donor, seed_path if i_am_lost else None)
            if seed is None:
                seed_path = None
        if any(r.get("uses_counter") for r in reports):
            _resume_counter(fresh, reports, members, machine, step, where)
            if fresh is not None and seed is not None:
                fresh.hold_next()  # settle() saves the agreed step again: the same value
    except BaseException:
        if seed is not None:
            seed.close()
        if seed_path is not None:
            seed_path.unlink(missing_ok=True)
        if mine is not None:
            mine.close()
        raise
    changes = _world_changes(members[donor].identity, step)
    if resized and step is not None:
        before = (members[donor].identity or {}).get("world_size")
        if before != place.world_size:
            changes.append([step, before, place.world_size])
    identity = {
        "job": job,
        "world_size": place.world_size,
        "local_rank": place.local_rank,
        "local_world_size": place.local_world_size,
        "node": place.node,
        "replicas": replicas,
        "world_changes": changes,
    }
    return MirrorSet(
        mine,
        where,
        place,
        identity,
        step,
        key=key,
        replicas=replicas,
        seed=seed,
        seed_path=seed_path,
        resized=resized and step is not None,
        stale=stale,
    )


def _reseed(job: str, step: int, rank: int, world_size: int) -> None:
    """Seed this process's global generators from ``(job, step, rank, world size)``.

    The rule after a world change: the old world's per-process generators
    cannot be mapped onto the new world's ranks, so every process draws fresh
    ones, the same for the same job, step and place.
    """
    import random

    import numpy as np

    h = hashlib.sha256(f"plinius elastic|{job}|{step}|{rank}|{world_size}".encode())
    seed = int.from_bytes(h.digest()[:8], "little")
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _world_changes(identity: dict[str, Any] | None, step: int | None) -> list[list[Any]]:
    """The world changes a saved identity records, up to ``step`` (a copy)."""
    saved = (identity or {}).get("world_changes") or []
    return [list(c) for c in saved if step is not None and c[0] <= step]


# ------------------------------------------------------------ the set's freshness counter
#
# One trusted counter protects the whole set. Every save of step k records, in
# each process's manifest, the value x(k) the step expects (the previous save's
# plus one, every ``counter_every`` saves: the same in every process). The
# process of rank 0 owns the counter and advances it to x(k) in its save of the
# next step, before committing that step (SetFreshness.before_commit); the step
# gate lets that save start only once every process committed k. Hence, after
# any crash, with s the step the set agrees on:
#   * counter <= x(s): the counter reaches x(j) only once every process
#     committed j, and a step every process committed is held by all of them;
#   * counter >= x(s) - 1: rank 0 holds s, so it committed s, after advancing
#     the counter to the value of the save before s.
# A set rolled back (one file or all of them) reads a counter above x(s); a
# counter below x(s) - 1 is another job's or was reset. The open finishes an
# interrupted advance (x(s) - 1 -> x(s): every process holds s).


def _member_freshness(
    counter: Counter | None, every: int, owner: bool, path: Path
) -> SetFreshness | None:
    """This process's part of the set's counter policy (``None`` without a counter)."""
    if counter is None:
        return None
    if type(every) is not int or every < 1:
        raise ConfigError(f"counter_every must be a positive integer, not {every!r}")
    return SetFreshness(counter if owner else None, every, label=str(path))


def _counter_report(counter: Counter | None, owner: bool) -> dict[str, Any]:
    """What this process tells the others about the counter: whether it has one, its value."""
    return {
        "uses_counter": counter is not None,
        "counter": counter.read() if owner and counter is not None else None,
        "machine_local": bool(getattr(counter, "machine_local", False)),
    }


def _resume_counter(
    fresh: SetFreshness | None,
    reports: list[dict[str, Any]],
    members: list[SetMember],
    machine: list[str],
    step: int | None,
    where: Path,
) -> None:
    """Check the set against its counter; the owner finishes an interrupted advance.

    Every process checks the same reports alike (rank 0 says the error); the
    owner's advance is then broadcast (value or error), so that all resume at
    the same value or all fail.
    """
    try:
        if not all(r.get("uses_counter") for r in reports):
            raise ConfigError(
                "only some processes of the job were given the freshness counter: give the "
                "same counter to every process (open_mirror_set(..., counter=...))"
            )
        if any(r.get("machine_local") for r in reports) and len(set(machine)) > 1:
            raise ConfigError(
                "this job spans several machines and its freshness counter is kept in one "
                "machine (a TPM): the process that owns it may run on another machine after "
                "a restart; use a counter every machine reaches (--counter keyserver)"
            )
        assert fresh is not None
        value = int(reports[0]["counter"])
        target = check_set_counter(members, step, value, where)
    except PliniusError as exc:
        exc.reported_by = 0  # type: ignore[attr-defined]
        raise
    box: list[Any] = [None]
    mine: PliniusError | None = None
    if fresh.counter is not None:
        try:
            box[0] = _bring_counter(fresh, value, target, step)
        except PliniusError as exc:
            mine = exc
            box[0] = (type(exc).__name__, str(exc))
    dist.broadcast_object_list(box, src=0)
    if mine is not None:
        mine.reported_by = 0  # type: ignore[attr-defined]
        raise mine
    if isinstance(box[0], tuple | list):
        raise _peer_error(0, *box[0])
    fresh.resume_at(int(box[0]))


def _bring_counter(fresh: SetFreshness, value: int, target: int, step: int | None) -> int:
    """The owner: finish an interrupted advance (or learn a new TPM index's base); the value."""
    counter = fresh.counter
    assert counter is not None
    if step is None and value == 0 and getattr(counter, "first_increment_may_jump", False):
        # A new set on a counter whose first increment may jump (a TPM index):
        # learn its base now, as a single mirror does when it is created.
        base = counter.increment()
        if base < 1:
            raise RollbackError(
                f"the freshness counter read {base} after an increment; it is not monotonic, "
                "so it cannot protect the mirror set: use another counter"
            )
        return base
    if value == target - 1:
        # A crash between the last global commit and its advance: every
        # process holds the step, so the advance is due.
        fresh.advance_to(target)
    return target


def _recorded(members: list[SetMember], step: int, where: Path) -> int | None:
    """The counter value every member's save of ``step`` records (``None``: none recorded)."""
    seen = {
        (s.counters[s.held.index(step)] if len(s.counters) == len(s.held) else None)
        for s in members
        if s.generation >= 0 and step in s.held
    }
    if len(seen) > 1:
        raise IntegrityError(
            f"the files of the mirror set {where} record different freshness-counter values "
            f"for step {step} ({', '.join(str(v) for v in sorted(seen, key=_order))}): files "
            "of different runs were mixed; put back the set's own files"
        )
    return seen.pop() if seen else None


def check_set_counter(members: list[SetMember], step: int | None, value: int, where: Path) -> int:
    """Check a set that resumes at ``step`` against its freshness counter at ``value``.

    Accepted: the counter at the value the step's saves record, or one below
    it (a crash between the last global commit and the counter's advance). A
    set with nothing saved accepts only a counter never advanced.

    Args:
        members: every process's file (as :func:`agree` takes them).
        step: the step the set agrees on (:func:`agree`).
        value: the counter's value now.
        where: the set's directory (for messages).

    Returns:
        The value the set's saves at ``step`` record (0 for a set written
        without a counter that starts using one now, with the counter at 0).

    Raises:
        RollbackError: the set (or files of it) is older than the counter says,
            or the counter is behind it by more than one (another job's, or reset).
        IntegrityError: the files record different values for the same step.
    """
    if step is None:
        if value > 0:
            raise RollbackError(
                f"the mirror set {where} holds no step every process committed, but its "
                f"freshness counter is at {value}: the set may have been deleted or replaced "
                "to roll training back. To start a new job on purpose, use a fresh counter "
                "(for example a new counter file)"
            )
        return 0
    expected = _recorded(members, step, where)
    if expected is None:
        if value > 0:
            raise RollbackError(
                f"the mirror set {where} (step {step}) was last written without a freshness "
                f"counter, but the counter is at {value}: it may be a rolled-back copy trained "
                "on without the counter; put back the newest files, or start a new job on "
                "purpose with a fresh counter"
            )
        return 0
    if value > expected:
        saved = [s for s in members if s.step is not None and s.counters]
        stale = [s for s in saved if s.counters[0] is not None and s.counters[0] < value]
        states = "; ".join(f"{s.path.name}: {_held_text(s.held)}" for s in members)
        if stale and len(stale) < len(saved):
            are = "is" if len(stale) == 1 else "are"
            named = f"{', '.join(str(s.path) for s in stale)} of the mirror set {where} {are}"
        else:
            named = f"the whole mirror set {where} is"
        raise RollbackError(
            f"{named} older than its freshness counter allows ({states}): step {step} expects "
            f"counter value {expected} but the counter is at {value}: a rollback. Put back the "
            "newest files, or start a new job on purpose with a fresh counter"
        )
    if value < expected - 1:
        raise RollbackError(
            f"the mirror set {where} (step {step}) expects freshness counter value {expected} "
            f"but the counter is only at {value}: the counter was reset or belongs to another "
            "job; use this job's counter"
        )
    return expected


def _agree_machines(
    members: list[SetMember],
    machine: list[str],
    world_size: int,
    where: Path,
    replicas: int,
    elastic: bool = False,
) -> tuple[int | None, set[int], bool]:
    """The step to resume from, the ranks to seed from a survivor, and whether the world changed.

    A machine is *lost* when none of its processes holds a saved step (its
    directory came back empty, or a seed was interrupted before its first save)
    while another machine's do. With replicas every survivor holds what the
    lost ones need; without, a lost machine is a missing file (:func:`agree`).
    With ``elastic``, a set written by another number of processes, or one
    whose processes without a saved step replicas cannot restore exactly, is
    *resized*: the survivors agree, every process without a saved step is seeded.
    """
    machines = sorted(set(machine))
    saved = [s for s in members if s.identity is not None]
    if elastic and saved:
        fresh = {r for r, s in enumerate(members) if s.identity is None}
        whole = {
            r
            for r, k in enumerate(machine)
            if all(members[q].identity is None for q, m in enumerate(machine) if m == k)
        }
        exact = replicas and all((s.identity or {}).get("replicas") for s in saved)
        other = any((s.identity or {}).get("world_size") != world_size for s in saved)
        if other or (fresh and not (exact and fresh == whole)):
            return agree(members, world_size, where, elastic=True), fresh, True
    if len(machines) > 1 and not replicas and not elastic:
        raise ConfigError(
            f"this job's mirror set spans {len(machines)} machines: open it with replicas "
            "(plinius train --replicas 1, or open_mirror_set(..., replicas=1)) so that a "
            "machine's loss loses nothing"
        )
    if saved and any(not (s.identity or {}).get("replicas") for s in saved) and replicas:
        replicas = 0  # written without replicas: nothing to seed a lost machine from
    lost_machines = {
        m
        for m in machines
        if all(s.identity is None for s, k in zip(members, machine, strict=True) if k == m)
    }
    if not saved or not replicas or len(lost_machines) in (0, len(machines)):
        return agree(members, world_size, where), set(), False
    lost = {r for r, k in enumerate(machine) if k in lost_machines}
    survivors = [s for r, s in enumerate(members) if r not in lost]
    return agree(survivors, world_size, where), lost, False


def _share_seed(
    mine: Mirror, key: MasterKey, step: int, donor: int, out: Path | None
) -> Mirror | None:
    """Send the donor's committed mirror (at ``step``) to every process; open it where ``out``.

    The bytes are the donor's file as it is (ciphertext: a memcpy, no
    decryption); the receiver writes them to ``out`` and opens that read-only,
    which authenticates it under the master key.
    """
    head = torch.zeros(2, dtype=torch.int64)
    body: Tensor
    if dist.get_rank() == donor:
        copy = mine.copy_committed()
        if copy.step != step:
            raise IntegrityError(
                f"the surviving process rank {donor} holds step {copy.step}, not the agreed "
                f"step {step}; restart the job"
            )
        head[0], head[1] = copy.nbytes, copy.file_size
        dist.broadcast(head, src=donor)
        body = torch.from_numpy(copy.buffer[: copy.nbytes])
    else:
        dist.broadcast(head, src=donor)
        body = torch.empty(int(head[0]), dtype=torch.uint8)
    dist.broadcast(body, src=donor)
    if out is None:
        return None
    with open(out, "wb") as f:
        f.write(body.numpy().tobytes())
        f.truncate(int(head[1]))
    seed = Mirror(out, key, readonly=True)
    got = seed.held_steps()[0]
    if got != step:  # an older (or newer) file of the donor's, replayed: authentic, not fresh
        seed.close()
        raise IntegrityError(
            f"the mirror received from rank {donor} holds step {got}, not the agreed step "
            f"{step}: it was replaced on the way; restart the job"
        )
    return seed


def _peer_error(rank: int, kind: str, message: str) -> PliniusError:
    """The error a process saw, raised again in every process; ``reported_by`` names it."""
    from . import errors

    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, PliniusError)):
        cls = ConfigError
    exc = cls(message)
    exc.reported_by = rank  # type: ignore[attr-defined]
    return exc


def _extra_members(where: Path, local_world_size: int) -> list[str]:
    """Files of the set beyond this machine's processes."""
    out = []
    for p in sorted(where.iterdir()):
        m = _MEMBER.match(p.name)
        if m is not None and int(m.group(1)) >= local_world_size:
            out.append(p.name)
    return out


def member_files(path: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """The process files of the mirror set at ``path``: ``(local rank, file)``, in order.

    Raises:
        FormatError: ``path`` holds no mirror set.
    """
    from .errors import FormatError

    where = Path(path)
    files = sorted(
        (int(m.group(1)), p)
        for p in (where.iterdir() if where.is_dir() else [])
        if (m := _MEMBER.match(p.name)) is not None
    )
    if not files:
        raise FormatError(f"{where} is not a mirror set (no local-N.plm files in it)")
    return files


def describe_set(
    path: str | os.PathLike[str], key: MasterKey, *, counter: Counter | None = None
) -> tuple[list[SetMember], int | None]:
    """Read every file of the mirror set at ``path`` (read-only) and where it would resume.

    Args:
        path: the set's directory.
        key: the master key.
        counter: the set's freshness counter, to refuse a rolled-back set
            (:func:`check_set_counter`; nothing is advanced); ``None``: not checked.

    Returns:
        The members in local-rank order, and the newest globally committed
        step (held by every member; ``None`` when nothing was committed).

    Raises:
        FormatError: ``path`` holds no mirror set.
        IntegrityError, RollbackError, ConfigError: as :func:`agree`; with
            ``counter``, RollbackError also for a set older than the counter
            allows, or one written without a counter.
    """

    where = Path(path)
    files = member_files(where)
    members: list[SetMember] = []
    by_rank = dict(files)
    world = None
    here = None
    for rank, p in files:
        with Mirror(p, key, readonly=True) as reader:
            s = _describe(p, rank, reader)
        members.append(s)
        if s.identity is not None:
            world = s.identity.get("world_size")
            # A machine's directory of a set across machines holds its own processes' files.
            here = s.identity.get("local_world_size", world)
    world = world if isinstance(world, int) else len(files)
    here = here if isinstance(here, int) else world
    for rank in range(here):
        if rank not in by_rank:
            members.append(SetMember(member_path(where, rank), rank, -1, (), None))
    members.sort(key=lambda s: s.local_rank)
    step = agree(members, world, where)
    if counter is not None:
        if step is not None and _recorded(members, step, where) is None:
            raise RollbackError(
                f"the mirror set {where} was last written without a freshness counter, so "
                "the counter cannot check it: it may be a rolled-back copy trained on without "
                "the counter; use the newest copy, or read it without a counter"
            )
        check_set_counter(members, step, counter.read(), where)
    return members, step


class SetView:
    """A mirror set read at its newest globally committed step (read-only).

    What ``plinius inspect``, ``export`` and ``evaluate`` read of a set: the
    model and optimizer are the same in every process under DDP, so process
    local-0's file is read, at the step every process holds (its committed
    generation, or the previous one when it was one save ahead).

    Args:
        path: the set's directory.
        key: the master key.
        counter: the set's freshness counter (checked, never advanced), or ``None``.

    Raises:
        as :func:`describe_set`.
    """

    def __init__(
        self, path: str | os.PathLike[str], key: MasterKey, *, counter: Counter | None = None
    ) -> None:
        self.members, self.step = describe_set(path, key, counter=counter)
        self._m = Mirror(self.members[0].path, key, readonly=True)

    def _at(self) -> dict[str, Any]:
        return {} if self.step is None else {"step": self.step}

    def _nothing(self, info: MirrorInfo) -> MirrorInfo:
        import dataclasses

        # No step is held by every process: the set holds nothing yet.
        return dataclasses.replace(info, generation=0, step=None, saved_at=None, num_tensors=0)

    def info(self) -> MirrorInfo:
        """As :meth:`Mirror.info`, at the set's step."""
        info = self._m.info(**self._at())
        return info if self.step is not None else self._nothing(info)

    def verify(self) -> MirrorInfo:
        """As :meth:`Mirror.verify`, at the set's step."""
        info = self._m.verify(**self._at())
        return info if self.step is not None else self._nothing(info)

    def read_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """As :meth:`Mirror.read_tensors`, at the set's step."""
        return self._m.read_tensors(prefix, **self._at())

    def restore_model(self, module: nn.Module, name: str = "model") -> int | None:
        """As :meth:`Mirror.restore_model`, at the set's step."""
        if self.step is None:
            return None
        return self._m.restore_model(module, name, step=self.step)

    def committed_tensors(self) -> list[TensorInfo]:
        """The tensors of process local-0's state (the same names at either step)."""
        return self._m.committed_tensors() if self.step is not None else []

    def committed_state_names(self) -> list[str]:
        """The flattened names of the tensors."""
        return [t.name for t in self.committed_tensors()]

    def committed_value(self, name: str, default: Any = None) -> Any:
        """A plain value of the job's state (its settings are the same at either step)."""
        return self._m.committed_value(name, default) if self.step is not None else default

    def close(self) -> None:
        """Close the file read."""
        self._m.close()

    def __enter__(self) -> SetView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
