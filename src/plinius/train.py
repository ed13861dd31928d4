"""The training loop that makes resumption exact.

:func:`fit` restores the full training state from a :class:`~plinius.mirror.Mirror`
(if it holds one), continues from the step after the last committed one, and
mirrors the state again after every ``mirror_every`` iterations.

Why the result is bit-for-bit the run that never crashed:

* the state in the mirror is *everything* the next step depends on: model
  (parameters and buffers), optimizer (momentum, Adam moments), scheduler, the
  global RNGs (Python, NumPy, torch), the sampler's seed, epoch and position,
  the step counter and the loss history;
* the data order derives from ``(seed, epoch)`` only, and the sampler position
  recorded is what the loop really consumed, not what a prefetching
  ``DataLoader`` has drawn ahead;
* a save is taken after ``optimizer.step()`` and before the next batch is drawn.

Mirroring overlaps the next iteration: ``save_async`` captures what the next
forward pass may change (buffers, RNG states, plain values) synchronously,
encrypts parameters and optimizer state in a background thread (AES-GCM
releases the GIL), and the loop joins it *before* the next ``optimizer.step()``,
the first moment parameters or optimizer state change again.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .data import SealedDataset, SealedSampler
from .data.loader import BatchStream, collate_tuple
from .dist import MirrorSet, StepGate
from .errors import ConfigError, IntegrityError, StateMismatchError
from .limits import MAX_LEARNING_RATE, check_learning_rate
from .mirror import DurableCopy, Mirror, PendingSave
from .rng import RNGState

__all__ = [
    "MAX_LEARNING_RATE",
    "FitResult",
    "StepEvent",
    "check_learning_rate",
    "evaluate",
    "fit",
    "make_sampler",
    "replan_schedule",
    "schedule_plan",
    "seed_everything",
    "training_state",
]

Batch = tuple[Tensor, ...]

# Job settings that older versions did not record: a mirror without one resumes
# (the setting was not recorded, so it cannot be checked).
_ADDED_SETTINGS = frozenset({"threads", "input_shape", "input_scale", "cfg_sha256"})


def _check_step_rates(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Refuse a rate a scheduler (or a restored optimizer) set beyond what optimizers take.

    0 is allowed here: a ``poly`` schedule ends at 0 on the job's last step.
    """
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if lr is None:
            continue
        value = float(lr)
        if not (math.isfinite(value) and 0 <= value <= MAX_LEARNING_RATE):
            raise ConfigError(
                f"the learning rate of parameter group {i} reached {value:g} at step {step}, "
                f"outside [0, {MAX_LEARNING_RATE:g}]: the optimizer cannot apply it; fix the "
                "schedule (a Darknet cfg's scales=) or the rate"
            )


def _label_range_error(bad: int, classes: int, where: str, verb: str) -> ConfigError:
    return ConfigError(
        f"{where} holds label {bad}, but the labels of {classes} classes are 0 to "
        f"{classes - 1}: {verb} with the data's number of classes (--num-classes), or fix "
        "the labels and seal the dataset again"
    )


def _check_labels(y: Tensor, classes: int, where: str, verb: str = "train") -> None:
    """Refuse class labels outside ``0 .. classes - 1`` (integer targets only).

    ``where`` names the batch and ``verb`` what the user reruns, for the message.
    """
    if y.numel() == 0 or y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise _label_range_error(lo, classes, where, verb)
    if hi >= classes:
        raise _label_range_error(hi, classes, where, verb)


def _classes_of(out: Tensor, y: Tensor) -> int | None:
    """The class count ``out`` implies for integer targets ``y``, or ``None`` if unclear.

    Logits ``(N, C)`` for ``N`` targets, ``(..., C)`` for targets ``(...)``, or
    torch's ``(N, C, d1, ...)`` for targets ``(N, d1, ...)``.
    """
    if y.dtype == torch.bool or y.is_floating_point() or not out.is_floating_point():
        return None
    found = set()
    if out.ndim == 2 and y.numel() == out.shape[0]:
        found.add(out.shape[1])
    if out.ndim == y.ndim + 1:
        if out.shape[:-1] == y.shape:
            found.add(out.shape[-1])
        if out.shape[0] == y.shape[0] and out.shape[2:] == y.shape[1:]:
            found.add(out.shape[1])
    return found.pop() if len(found) == 1 else None


def _loss_checked(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    out: Tensor,
    y: Tensor,
    where: str,
    verb: str = "train",
) -> Tensor:
    """``loss_fn(out, y)``; a torch error caused by labels outside the classes is a ConfigError."""
    try:
        return loss_fn(out, y)
    except (IndexError, RuntimeError) as exc:
        classes = _classes_of(out, y)
        if classes is not None:
            try:
                _check_labels(y, classes, where, verb)
            except ConfigError as bad:
                raise bad from exc
        raise


@dataclass(frozen=True)
class StepEvent:
    """One completed training step, as :func:`fit` reports it to its ``callback``.

    Attributes:
        step: Steps completed in the job so far, counting those restored from
            the mirror (1 after the first step).
        total: The job's total steps.
        loss: This step's training loss.
        lr: The learning rate of the first parameter group after the step
            (after the scheduler stepped).
        saved: Whether a save of this step was started. It is durable once
            the next step has joined it (or at once with ``async_save=False``
            and on the last step).
    """

    step: int
    total: int
    loss: float
    lr: float
    saved: bool


@dataclass
class FitResult:
    """What :func:`fit` returns: the job's losses and how this call ran it.

    Attributes:
        losses: The loss of every step of the job, including steps run before a
            crash and restored from the mirror, so it compares with an
            uninterrupted run.
        resumed_from: The step the job resumed after, or ``None`` for a fresh start.
        recovery_s: Seconds the restore took (0 without a mirror).
        steps_run: Steps this call ran (the total minus those restored).
        final_step: The job's total steps.
        saves: Saves this call made into the mirror.
        save_wait_s: Seconds the loop waited for background saves to finish.
        step_times_s: The wall time of each step this call ran, save included.
        replanned_from: The total steps the mirror's job had when this call
            changed it (``steps`` raised, say from 150 to 200), else ``None``.
        gate_bytes_sent: Bytes this process put into the step gate's
            all-gathers (a multi-process job; 0 otherwise): two numbers a
            step, and its sealed replica on each saved step with replicas.
    """

    losses: list[float]
    resumed_from: int | None
    recovery_s: float
    steps_run: int
    final_step: int
    saves: int
    save_wait_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    replanned_from: int | None = None
    gate_bytes_sent: int = 0


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators.

    Args:
        seed: Any non-negative integer (NumPy gets it modulo 2**32).
    """
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _default_split(batch: Batch) -> tuple[Tensor, Tensor]:
    return batch[0], batch[-1]


def _identity(x: Tensor) -> Tensor:
    return x


def make_sampler(
    dataset: Dataset[Any], *, seed: int, shuffle: Literal["chunk", "full"] | bool
) -> SealedSampler:
    """The sampler :func:`fit` uses: order from ``(seed, epoch)``, chunk-aware for sealed data.

    Args:
        dataset: The dataset; a :class:`~plinius.data.SealedDataset` gets a
            sampler that knows its chunks, any other one a plain index order.
        seed: Seed of the order.
        shuffle: ``"chunk"``, ``"full"`` or ``False`` (file order).

    Returns:
        A :class:`~plinius.data.SealedSampler` at the start of epoch 0.
    """
    if isinstance(dataset, SealedDataset):
        sampler = SealedSampler(dataset, seed=seed, shuffle=shuffle)
    else:
        sampler = SealedSampler(len(dataset), seed=seed, shuffle=shuffle)  # type: ignore[arg-type]
    sampler.set_epoch(0)
    return sampler


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any | None,
    sampler: SealedSampler,
    losses: Tensor,
    total: int,
    dataset_id: str | None = None,
    job: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict :func:`fit` mirrors: everything the next step depends on.

    The whole loss history lives in the mirror as one float64 tensor, so a
    resumed job returns the same losses as one that never crashed.

    Args:
        model: The module trained.
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler, or ``None``.
        sampler: The data order (:func:`make_sampler`).
        losses: A float64 tensor with one entry per step of the job.
        total: The job's total steps.
        dataset_id: The sealed dataset's id, or ``None``; a resume refuses another one.
        job: The settings a resume must match (batch size, seed, ...).

    Returns:
        The state dict, for :meth:`~plinius.mirror.Mirror.save` and
        :meth:`~plinius.mirror.Mirror.restore`; the global generators
        (:class:`~plinius.mirror.RNGState`) are in it.
    """
    state: dict[str, Any] = {
        "model": model,
        "optim": optimizer,
        "rng": RNGState(),
        "sampler": sampler,
        "losses": losses,
        "total_steps": total,
        # Which sealed dataset the job trains on: a resumed job refuses another
        # one, even one of the same shape sealed under the same key.
        "dataset_id": dataset_id,
        # The settings that decide what the job computes (batch size, seed,
        # shuffle, ...): a resume with other ones is refused, not mixed in.
        "job": dict(job or {}),
    }
    if scheduler is not None:
        state["sched"] = scheduler
    return state


def _other_model(mirror: Mirror, job: dict[str, Any]) -> str | None:
    """The message for a mirror that holds another model's job, or ``None``.

    Names the models rather than listing the tensors whose shapes differ.
    """
    try:
        saved = mirror.committed_value("job")
    except ConfigError:
        return None
    if not isinstance(saved, dict) or "model" not in saved or "model" not in job:
        return None
    if saved["model"] == job["model"]:
        return None
    return (
        f"the mirror holds a job of model {saved['model']}; you asked for {job['model']}: "
        f"resume with model {saved['model']} or use a new mirror file"
    )


def _setting(settings: dict[str, Any], name: str) -> str:
    """A job setting for a mismatch message; ``None`` and absence spelled out."""
    if name not in settings:
        return "not recorded"
    value = settings[name]
    return "unset (the default)" if value is None else repr(value)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    dataset: Dataset[Any],
    batch_size: int,
    steps: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    mirror: Mirror | MirrorSet | None = None,
    scheduler: Any | None = None,
    mirror_every: int = 1,
    async_save: bool = True,
    shuffle: Literal["chunk", "full"] | bool = "chunk",
    prepare: Callable[[Tensor], Tensor] | None = None,
    split: Callable[[Batch], tuple[Tensor, Tensor]] | None = None,
    num_workers: int = 0,
    callback: Callable[[StepEvent], None] | None = None,
    extra_state: dict[str, Any] | None = None,
    on_resume: Callable[[int | None, float], None] | None = None,
    job_info: dict[str, Any] | None = None,
    num_classes: int | None = None,
    on_replan: Callable[[str], None] | None = None,
    durable: DurableCopy | None = None,
) -> FitResult:
    """Train ``model`` for ``steps`` iterations (or ``epochs``), resumably.

    With a ``mirror``, the state is restored on start (nothing happens if the
    mirror is empty) and mirrored after every ``mirror_every`` steps and after
    the last one. ``steps`` is the job's total: calling ``fit`` again with the
    same arguments after a crash finishes the same job, with the same result.
    Calling it with another ``steps`` (at least the steps the mirror already
    did) continues the job from the mirror's state with the new total: the
    loss history is resized and the ``scheduler`` re-planned for the new total
    (see :func:`replan_schedule`); ``on_replan`` is told so in one line.
    With ``async_save`` the save of step *n* runs while step *n+1* computes its
    forward and backward pass and is joined before its ``optimizer.step()``.

    Args:
        model: The module to train (put in training mode).
        optimizer: Its optimizer.
        loss_fn: ``(model output, target) -> scalar loss``.
        dataset: A map-style dataset with a length; a
            :class:`~plinius.data.SealedDataset` is read a batch at a time.
        batch_size: Records per step; an epoch's last incomplete batch is dropped.
        steps: The job's total steps. Give this or ``epochs``.
        epochs: The job's length in whole epochs instead.
        seed: Seed of the data order (and of DataLoader workers' generators).
        mirror: Where the training state is mirrored, or ``None`` for none.
            Under ``torchrun`` (a process group of several processes), this
            process's part of a mirror set (:func:`plinius.dist.open_mirror_set`):
            each process mirrors its own state, a step counts once every
            process committed it, and the model must be wrapped in
            DistributedDataParallel (:func:`plinius.dist.wrap_ddp`);
            ``batch_size`` is then the whole job's batch, split evenly.
        scheduler: A learning-rate scheduler, stepped after every step
            (``ReduceLROnPlateau`` with the step's loss), or ``None``.
        mirror_every: Mirror every this many steps (and after the last one).
        async_save: Overlap each save with the next step (``save_async``).
        shuffle: ``"chunk"`` (chunk-local, fast on sealed data), ``"full"``
            (uniform) or ``False`` (file order); see :class:`~plinius.data.SealedSampler`.
        prepare: Maps a batch's raw input field to the model's input.
        split: Maps a batch of fields to ``(input, target)``; default: the
            first and the last field.
        num_workers: DataLoader worker processes; 0 reads in this process.
        callback: Receives a :class:`StepEvent` after each step.
        extra_state: More entries for the mirrored state (their names must
            not be ``fit``'s own).
        on_resume: Called once, after the restore, with the step resumed
            after (or ``None``) and the seconds the restore took.
        job_info: Plain settings (say the model name and learning rate) added
            to those a resume must match (batch size, seed, shuffle,
            ``mirror_every``, the number of torch threads).
        num_classes: The number of classes: each batch's integer targets are
            checked to lie in ``0 .. num_classes - 1`` before the forward pass.
            ``None`` checks them only when the loss fails, against the class
            count the model's output implies.
        on_replan: Called once, with one line saying what changed, when the
            mirror's job had another total than ``steps`` and is continued
            with the new one.
        durable: The durable tier (needs ``mirror``): after a commit, when due
            and after the last step, a copy of the committed mirror is taken
            and written to disk in the background. The caller closes it.

    Returns:
        A :class:`FitResult`: the loss of every step of the job, how it resumed,
        how many saves this call made.

    Raises:
        ConfigError: Bad arguments: a non-positive ``batch_size`` or
            ``mirror_every``, both or neither of ``steps`` and ``epochs``, a
            dataset smaller than one batch, reserved names in ``extra_state``,
            a learning rate that is not finite, above 0 and at most
            :data:`MAX_LEARNING_RATE` (on start, or set so by the scheduler);
            a batch with a label outside the classes. Raised before the
            step's update: the mirror keeps the last committed step.
        StateMismatchError: The mirror holds another job: another model,
            optimizer or settings (the message names them; the thread count
            is one, as float sums depend on it), or it already did more than
            ``steps`` steps.
        IntegrityError: The mirror was trained on another dataset, or fails
            authentication.
        RollbackError: The mirror is older than its freshness counter allows.
    """
    if batch_size <= 0:
        raise ConfigError("batch size must be positive")
    if mirror_every <= 0:
        raise ConfigError("mirror_every must be positive")
    if durable is not None and mirror is None:
        raise ConfigError("a durable copy needs a mirror to copy")
    try:
        n_records = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError("fit needs a map-style dataset with a length") from exc
    per_epoch = n_records // batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"the dataset has {n_records} records, fewer than one batch of {batch_size}; "
            "use a smaller batch size"
        )
    if (steps is None) == (epochs is None):
        raise ConfigError("give exactly one of steps or epochs")
    total = steps if steps is not None else per_epoch * int(epochs or 0)
    if total <= 0:
        raise ConfigError("the number of steps must be positive")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, not {num_classes}")
    for i, group in enumerate(optimizer.param_groups):
        # A scheduler keeps the rate it was given as initial_lr (and may start lower).
        lr = group.get("initial_lr", group.get("lr"))
        if lr is not None:
            check_learning_rate(lr, f"the learning rate of parameter group {i}")
    prepare = prepare or _identity
    split = split or _default_split
    # Under torchrun: this process's share of every batch, and the step gate.
    gate = StepGate.for_job(model, mirror, batch_size)
    if gate is not None and durable is not None:
        raise ConfigError("the durable tier is not supported in a multi-process job yet")
    members = mirror if isinstance(mirror, MirrorSet) else None
    own: Mirror | None = mirror.mirror if isinstance(mirror, MirrorSet) else mirror
    core = gate.module if gate is not None else model
    if members is not None and isinstance(model, nn.parallel.DistributedDataParallel):
        # One process left of a set (an elastic job scaled down): the state is
        # the inner model's, as in every world of the set.
        core = model.module

    sampler = make_sampler(dataset, seed=seed, shuffle=shuffle)
    losses = torch.full((total,), math.nan, dtype=torch.float64)
    dataset_id = dataset.dataset_id if isinstance(dataset, SealedDataset) else None
    job = {
        "batch_size": batch_size,
        "seed": seed,
        "shuffle": shuffle if isinstance(shuffle, str) else bool(shuffle),
        "mirror_every": mirror_every,
        # Float sums split across threads depend on their number: another
        # thread count computes another result, so it is a setting too.
        "threads": torch.get_num_threads(),
        **(job_info or {}),
    }
    if members is not None:
        job["world_size"] = members.place.world_size
    state = training_state(
        core,
        optimizer,
        scheduler=scheduler,
        sampler=sampler,
        losses=losses,
        total=total,
        dataset_id=dataset_id,
        job=job,
    )
    replicas = members is not None and gate is not None and members.replicas > 0
    if replicas:
        assert members is not None and gate is not None
        # Every process's sealed replica of its own part (RNG, buffers), kept
        # with each saved step: what a lost machine's processes resume from.
        state["replicas"] = torch.zeros(members.attach(gate.module), dtype=torch.uint8)
    if extra_state:
        overlap = set(extra_state) & set(state)
        if overlap:
            raise ConfigError(f"extra_state may not use the reserved names {sorted(overlap)}")
        state.update(extra_state)
    if members is not None:
        # Which job, world size and place this file belongs to: the set's check on restart.
        state["dist"] = dict(members.identity)

    start = 0
    resumed_from: int | None = None
    replanned_from: int | None = None
    recovery_s = 0.0
    if own is not None:
        t0 = time.perf_counter()
        # Another total than the mirror's job: restore into a state of the saved
        # length, then continue with the new one (below).
        reader = members.reader if members is not None else own
        replanned_from = _saved_job_length(reader, total)
        plan: dict[str, Any] | None = None
        if replanned_from is not None:
            plan = schedule_plan(scheduler)
            state["losses"] = torch.full((replanned_from,), math.nan, dtype=torch.float64)
        try:
            restored = members.restore(state) if members is not None else own.restore(state)
        except StateMismatchError as exc:
            other = _other_model(reader, job)
            if other is not None:
                raise StateMismatchError(other) from exc
            raise StateMismatchError(
                f"{exc}. The mirror was written by a job with other settings "
                "(model, optimizer, number of steps, ...): rerun with the same settings "
                "or use a new mirror file"
            ) from exc
        recovery_s = time.perf_counter() - t0
        if restored is not None:
            if replanned_from is not None and state["total_steps"] == replanned_from:
                losses = _resized(state["losses"], total)
                state["losses"], state["total_steps"] = losses, total
                said = replan_schedule(scheduler, optimizer, plan, total)
                if on_replan is not None:
                    on_replan(
                        f"the job was {replanned_from} steps, now {total}: it continues after "
                        f"step {restored}; {said}"
                    )
            if state["total_steps"] != total:
                raise StateMismatchError(
                    f"the mirror belongs to a job of {state['total_steps']} steps, not {total}; "
                    "rerun with the same number of steps"
                )
            if state["dataset_id"] != dataset_id:
                raise IntegrityError(
                    f"the mirror was trained on dataset {state['dataset_id']}, "
                    f"not on {dataset_id}: resume with the job's own dataset"
                )
            saved = state["job"]
            if members is not None and members.resized:
                # An elastic job goes on in another world: the same job all the same.
                saved = {**saved, "world_size": job["world_size"]}
            # A setting a mirror does not record (written before it was) is not checked.
            now = {k: v for k, v in job.items() if k in saved or k not in _ADDED_SETTINGS}
            if saved != now:
                diff = [
                    f"{k}={_setting(saved, k)} (now {_setting(now, k)})"
                    for k in sorted(set(saved) | set(now))
                    if saved.get(k) != now.get(k)
                ]
                raise StateMismatchError(
                    "the mirror belongs to a job with other settings: "
                    + ", ".join(diff)
                    + "; rerun with the job's own settings or use a new mirror file"
                )
            # From now on the mirror records every setting (thread count included).
            state["job"] = job
            if members is not None:
                state["dist"] = dict(members.identity)
                # A process seeded from a survivor (its machine was lost) has
                # its own mirror hold the step at once.
                members.settle(state)
            start = restored
            resumed_from = restored
    if start > total:
        raise StateMismatchError(f"the mirror is at step {start}, beyond this job's {total} steps")

    if durable is not None:
        durable.start_at(resumed_from)
    if on_resume is not None:
        on_resume(resumed_from, recovery_s)
    model.train()
    shard = (gate.rank, gate.world_size) if gate is not None else (0, 1)
    source = BatchStream(dataset, sampler, batch_size, num_workers, shard=shard)
    pending: PendingSave | None = None
    committed = start  # the last step this process committed
    saves = 0
    save_wait = 0.0
    step_times: list[float] = []
    try:
        for step in range(start, total):
            t_step = time.perf_counter()
            batch = source.next()
            x, y = split(batch)
            where = f"the batch of step {step + 1}"
            if num_classes is not None:
                _check_labels(y, num_classes, where)
            out = model(prepare(x))
            loss = _loss_checked(loss_fn, out, y, where)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            # IMPORTANT: the background save of the previous step reads the
            # parameters and optimizer state; join it before they change.
            if pending is not None:
                tw = time.perf_counter()
                pending.wait()
                save_wait += time.perf_counter() - tw
                if durable is not None and own is not None:
                    # Committed and nothing in flight: the moment to copy it.
                    durable.after_commit(own, pending.step)
                committed = pending.step
                pending = None
            loss_value = float(loss.detach())
            done = step + 1
            commit = own is not None and (done % mirror_every == 0 or done == total)
            if gate is not None:
                # Every process tells its loss and last commit (and, on a step
                # it saves, its sealed replica: the generators and buffers do
                # not change in optimizer.step); the gather runs while this
                # process steps its optimizer.
                blob = members.seal_own(done) if replicas and commit else None  # type: ignore[union-attr]
                gate.start(loss_value, committed, blob)
            _check_step_rates(optimizer, step + 1)
            optimizer.step()
            if gate is not None:
                # The job's loss (the same on every process), and the proof that
                # every process committed what this one did: only then may the
                # save below reuse the slots of the step before.
                loss_value = gate.finish(committed)
                if replicas and commit:
                    state["replicas"].copy_(gate.blobs)
            if members is not None and members.stale and committed > start:
                # Every process committed a step of this world (the gate said
                # so): the files of the local ranks it no longer has may go.
                members.drop_stale()
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(loss_value)  # it steps on a metric: the training loss
            elif scheduler is not None:
                scheduler.step()
            # Only now is the batch really consumed: record it in the sampler (by
            # the whole batch: the cursor counts the job's samples, not this process's).
            sampler.advance(source.last_size)
            losses[step] = loss_value
            if commit:
                assert own is not None
                if async_save and done < total:
                    pending = own.save_async(state, step=done)
                else:
                    own.save(state, step=done)
                    committed = done
                    if durable is not None:
                        durable.after_commit(own, done, force=done == total)
                saves += 1
            step_times.append(time.perf_counter() - t_step)
            if callback is not None:
                callback(
                    StepEvent(
                        step=done,
                        total=total,
                        loss=loss_value,
                        lr=float(optimizer.param_groups[0]["lr"]),
                        saved=commit,
                    )
                )
    except BaseException:
        # Finish the pending save, but never let its error hide the first one.
        if pending is not None:
            with contextlib.suppress(Exception):
                pending.wait()
        raise
    if pending is not None:
        pending.wait()
    if own is not None and replanned_from is not None and start == total:
        own.save(state, step=total)  # nothing to run: record the new total all the same
    return FitResult(
        losses=[float(v) for v in losses.tolist()],
        resumed_from=resumed_from,
        recovery_s=recovery_s,
        steps_run=total - start,
        final_step=total,
        saves=saves,
        save_wait_s=save_wait,
        step_times_s=step_times,
        replanned_from=replanned_from,
        gate_bytes_sent=gate.bytes_sent if gate is not None else 0,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset[Any],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch_size: int = 256,
    prepare: Callable[[Tensor], Tensor] | None = None,
    split: Callable[[Batch], tuple[Tensor, Tensor]] | None = None,
    num_classes: int | None = None,
) -> tuple[float, float]:
    """The accuracy and mean loss of ``model`` over ``dataset``, in order, in eval mode.

    Accuracy compares the arg-max of the last output dimension with the target.
    The model's training mode is restored afterwards.

    Args:
        model: The module to evaluate.
        dataset: A map-style dataset (a :class:`~plinius.data.SealedDataset`
            is read a batch at a time).
        loss_fn: ``(model output, target) -> scalar loss``, averaged over a batch.
        batch_size: Records per forward pass.
        prepare: Maps a batch's raw input field to the model's input.
        split: Maps a batch of fields to ``(input, target)``; default: the
            first and the last field.
        num_classes: The number of classes: integer targets are checked to lie
            in ``0 .. num_classes - 1`` before the forward pass; ``None`` checks
            them when the loss fails, against the class count the output implies.

    Returns:
        ``(accuracy, loss)``: the fraction of targets predicted, from 0 to 1,
        and the loss averaged over every target.

    Raises:
        ConfigError: A non-positive ``batch_size``, an empty dataset, or a
            label outside the classes.
    """
    prepare = prepare or _identity
    split = split or _default_split
    if batch_size <= 0:
        raise ConfigError("batch size must be positive")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, not {num_classes}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ConfigError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    correct = 0
    count = 0
    loss_sum = 0.0
    try:
        for lo in range(0, n, batch_size):
            idx = list(range(lo, min(n, lo + batch_size)))
            if isinstance(dataset, SealedDataset):
                batch: Batch = tuple(dataset.get_batch(idx))
            else:
                batch = collate_tuple([dataset[i] for i in idx])
            x, y = split(batch)
            where = f"the batch of records {lo} to {idx[-1]}"
            if num_classes is not None:
                _check_labels(y, num_classes, where, "evaluate")
            out = model(prepare(x))
            loss_sum += float(_loss_checked(loss_fn, out, y, where, "evaluate")) * y.numel()
            correct += int((out.argmax(dim=-1) == y).sum())
            count += y.numel()
    finally:
        model.train(was_training)
    return correct / count, loss_sum / count


# Changing a job's length: fit(steps=200) on the mirror of a 150-step job.

# What a scheduler's state_dict says about its progress, as opposed to its plan.
_SCHED_PROGRESS = frozenset(
    {"last_epoch", "_step_count", "_is_initial", "_get_lr_called_within_step", "_last_lr"}
)


def _saved_job_length(mirror: Mirror, total: int) -> int | None:
    """The total steps of the mirror's job where it is not ``total``, else ``None``.

    Read from the length of the committed ``losses`` tensor (one entry per step
    of the job) before anything is restored. A mirror without one is left to
    the restore, which names what does not fit.

    Raises:
        StateMismatchError: The mirror already did more than ``total`` steps.
    """
    done = mirror.info().step
    if done is None:
        return None
    shapes = [t.shape for t in mirror.committed_tensors() if t.name == "losses"]
    if len(shapes) != 1 or len(shapes[0]) != 1 or shapes[0][0] == total:
        return None
    if done > total:
        raise StateMismatchError(
            f"the mirror already did {done} steps of its {shapes[0][0]}-step job, more than "
            f"the {total} asked for: ask for {done} steps or more (--steps) to finish or "
            "continue it, or use a new mirror file"
        )
    return shapes[0][0]


def _resized(saved: Tensor, total: int) -> Tensor:
    """The loss history for a job of ``total`` steps: the saved losses, then NaN."""
    out = torch.full((total,), math.nan, dtype=torch.float64)
    n = min(total, len(saved))
    out[:n] = saved[:n]
    return out


def schedule_plan(scheduler: Any | None) -> dict[str, Any] | None:
    """A copy of a freshly built scheduler's state, for :func:`replan_schedule`.

    Args:
        scheduler: The scheduler built for the new total, before the restore.

    Returns:
        A deep copy of its ``state_dict()``, or ``None`` for anything that is
        not a torch ``LRScheduler`` (``ReduceLROnPlateau``, ``None``).
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        return copy.deepcopy(scheduler.state_dict())
    return None


def replan_schedule(
    scheduler: Any | None,
    optimizer: torch.optim.Optimizer,
    plan: dict[str, Any] | None,
    total: int,
) -> str:
    """Fit a restored scheduler to a job's new total; say what that did.

    The restore left the scheduler and the optimizer's rates where the saved
    job's last step put them. What the next steps get:

    * ``LambdaLR`` (Darknet's policies, ``plinius train``'s schedules): the
      rate ``base_lr * lambda(step)`` with the lambdas built for the new total,
      so a ``poly`` schedule follows the new plan from the next step; a lambda
      that ignores the total gives the very rates of an uninterrupted job;
    * a scheduler whose plan (its state without the progress) is the saved
      one, such as ``StepLR``: it continues unchanged, exactly;
    * one whose plan changed (``OneCycleLR``'s ``total_steps``,
      ``CosineAnnealingLR``'s ``T_max``): the new plan at the saved step, its
      rates there computed in closed form (a chained schedule such as
      ``CosineAnnealingLR`` then equals the new plan's up to rounding);
    * ``ReduceLROnPlateau``, other objects, no scheduler: nothing to re-plan.

    Args:
        scheduler: The restored scheduler, or ``None``.
        optimizer: Its optimizer (restored).
        plan: :func:`schedule_plan` of the scheduler built for the new total.
        total: The job's new total steps.

    Returns:
        What happened, for the one line ``fit`` reports.

    Raises:
        ConfigError: The plan changed and the scheduler has no closed form to
            compute its rates at the saved step from.
    """
    if scheduler is None:
        return "no learning-rate schedule to re-plan"
    name = type(scheduler).__name__
    lrs = torch.optim.lr_scheduler
    if plan is None:
        return f"the {name} schedule continues from its saved state"
    if isinstance(scheduler, lrs.LambdaLR):
        # The lambdas are not in the state: they are those built for the new total.
        rates = [
            base * fn(scheduler.last_epoch)
            for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
        ]
    else:
        saved = scheduler.state_dict()
        if {k: v for k, v in saved.items() if k not in _SCHED_PROGRESS} == {
            k: v for k, v in plan.items() if k not in _SCHED_PROGRESS
        }:
            return f"the {name} schedule does not depend on the job's length: it continues"
        closed = getattr(scheduler, "_get_closed_form_lr", None)
        if closed is None and not isinstance(scheduler, lrs.OneCycleLR):
            raise ConfigError(
                f"the {name} schedule was planned for another number of steps and cannot be "
                "re-planned at the saved step: rerun with the job's own number of steps, or "
                "start a new job (plinius train --init-from)"
            )
        scheduler.load_state_dict(
            {**plan, **{k: v for k, v in saved.items() if k in _SCHED_PROGRESS}}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # get_lr outside step() warns; it is meant here
            rates = closed() if closed is not None else scheduler.get_lr()
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return f"the {name} schedule is re-planned for {total} steps"
