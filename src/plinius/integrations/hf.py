"""Hugging Face ``Trainer``: mirror every optimizer step into plinius, resume ``train()`` from it.

::

    from plinius.integrations.hf import PliniusMirrorCallback, PliniusTrainer

    trainer = PliniusTrainer(
        model=model, args=TrainingArguments(..., save_strategy="no"), train_dataset=ds,
        callbacks=[PliniusMirrorCallback("/dev/shm/job.plm", key, job="run-1")],
    )
    trainer.train()        # after a crash: the same lines resume from the last mirrored step

:class:`PliniusMirrorCallback` commits, after every K-th optimizer step, one
generation of a :class:`~plinius.mirror.Mirror` holding the model, the
optimizer, the scheduler (and the AMP scaler when there is one), the
``TrainerState`` (global step, epoch, log history, the stateful callbacks'
states), the loss accumulators behind the logged losses, and the global random
generators (Python, NumPy, torch). A step's commit is made once the step is
over (its logging, evaluation and ``save_steps`` checkpoint done): at the next
step's ``on_step_begin``, the next epoch's ``on_epoch_begin`` or
``on_train_end``, the very points where the Trainer's own resume puts the
random generators back.

:class:`PliniusTrainerMixin` (``PliniusTrainer`` is ``Trainer`` with it) makes
``train()`` resume from the mirror through the Trainer's own resume path:
the ``TrainerState`` is the mirror's, so ``Trainer`` skips the epochs and the
batches already trained on (its ``global_step`` arithmetic, exact when the
batch order depends only on the seed and the epoch: accelerate's seedable
sampler, the default); the optimizer, scheduler, scaler and random generators
are loaded where the Trainer loads a checkpoint's. Nothing is read from or
written to ``output_dir`` for it: no plaintext checkpoint. An explicit
``train(resume_from_checkpoint=...)`` wins over the mirror.

Not restored: what the Trainer's own checkpoints do not hold either (a
DataLoader's worker processes, timing metrics such as ``train_runtime``).
Single-process training only (no DeepSpeed, FSDP or several processes yet).

Requires the ``hf`` extra (``pip install 'plinius[hf]'``). Relies on the
Trainer's resume hooks (``_inner_training_loop``, ``_init_training_state``,
``_load_optimizer_and_scheduler``, ``_load_scaler``, ``_load_rng_state``),
tested with transformers 5.18 and accelerate 1.15.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import compare_trainer_and_checkpoint_args

from ..counters import Counter
from ..crypto import MasterKey
from ..errors import ConfigError
from ..mirror import Mirror
from ._common import MirrorSettings, check_job, job_state, resume_job

__all__ = ["PliniusMirrorCallback", "PliniusTrainer", "PliniusTrainerMixin"]

_HOLDER = "hf"


class _FromMirror(str):
    """The ``resume_from_checkpoint`` the Trainer is given when it resumes from the mirror.

    The Trainer only passes it on to the load hooks, which recognise it; it
    names no directory, so nothing is ever read from disk for it.
    """


def _job(model: Any, name: str | None) -> dict[str, Any]:
    cls = type(model)
    return {"framework": "hf", "module": f"{cls.__module__}.{cls.__qualname__}", "name": name or ""}


class PliniusMirrorCallback(MirrorSettings, TrainerCallback):  # type: ignore[misc]
    """Mirror the ``Trainer``'s state after every ``every_n_steps`` optimizer steps.

    Use it with :class:`PliniusTrainer` (or a Trainer class with
    :class:`PliniusTrainerMixin`), which resumes ``train()`` from the mirror.

    Args:
        path: the mirror file (``/dev/shm/...`` for emulated persistent memory).
        key: the master key.
        every_n_steps: mirror after every K-th optimizer step.
        job: a name for this job, recorded and checked on resume (a mirror of
            another job, or of another model class, is refused).
        counter: a freshness counter (:mod:`plinius.counters`) for the mirror.

    On resume, ``train()`` stops with the plinius error (nothing overwritten)
    when the key is wrong (``WrongKeyError``), the mirror is another job's or
    the model's parameters changed (``StateMismatchError``), or the mirror
    fails authentication (``IntegrityError``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: MasterKey,
        *,
        every_n_steps: int = 1,
        job: str | None = None,
        counter: Counter | None = None,
    ) -> None:
        self._configure(path, key, every_n_steps, job, counter)
        self._trainer: Trainer | None = None
        self._pending = False
        self._loaded: dict[str, Any] | None = None
        self.resumed_step: int | None = None
        """The step ``train()`` resumed from (None: it started afresh)."""
        self.committed_step: int | None = None
        """The last step this run committed to the mirror."""

    # -- used by PliniusTrainerMixin ------------------------------------------------

    def _open(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self._pending = False
        self._loaded = None
        self.resumed_step = None
        self._mirror = Mirror(self.path, self._key, counter=self._counter)
        # Checked now, not only on resume: a run given an explicit checkpoint
        # must not overwrite another job's mirror either.
        if self._mirror.info().generation > 0:
            check_job(self._mirror, _job(trainer.model, self._name), self.path)

    def _restore(self, trainer: Trainer) -> bool:
        """Restore the model in place and keep the rest for the load hooks; whether resuming."""
        assert self._mirror is not None
        step, ckpt = resume_job(
            self._mirror, _job(trainer.model, self._name), trainer.model, _HOLDER, self._rng,
            self.path,
        )  # fmt: skip
        self._loaded = ckpt
        self.resumed_step = step if ckpt is not None else None
        return ckpt is not None

    def _close(self) -> None:
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None
        self._trainer = None

    # -- TrainerCallback events -----------------------------------------------------

    def on_train_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        """Put the loss accumulators back (the Trainer zeroed them after loading)."""
        if self._trainer is None:
            raise ConfigError(
                "PliniusMirrorCallback needs a Trainer that can resume from it: use "
                "plinius.integrations.hf.PliniusTrainer (or add PliniusTrainerMixin to your "
                "Trainer class)"
            )
        if self._loaded is not None:
            t, logging = self._trainer, self._loaded["logging"]
            t._tr_loss = logging["tr_loss"].to(args.device)
            t._total_loss_scalar = logging["total_loss_scalar"]
            t._globalstep_last_logged = logging["globalstep_last_logged"]
            t.current_flos = logging["current_flos"]

    def on_step_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        """After the optimizer step: mark it to commit once the step is over."""
        self._pending = state.global_step % self._every == 0

    def on_step_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        """Commit the previous step (its batches of the next step are fetched; no RNG drawn)."""
        self._commit(state)

    def on_epoch_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        """Commit the last step of the previous epoch, before the new epoch draws its order."""
        self._commit(state)

    def on_train_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        """Commit the last step: a rerun of the finished job trains no further."""
        self._commit(state, finished=True)

    def _commit(self, state: TrainerState, *, finished: bool = False) -> None:
        if not self._pending or self._mirror is None or self._trainer is None:
            return
        self._pending = False
        t = self._trainer
        ckpt = _checkpoint(t, finished)
        self._mirror.save(
            job_state(_job(t.model, self._name), t.model, _HOLDER, ckpt, self._rng),
            step=state.global_step,
        )
        self.committed_step = state.global_step


def _checkpoint(trainer: Trainer, finished: bool) -> dict[str, Any]:
    """What the Trainer's own checkpoint holds besides the weights and RNG, as one dict."""
    t: Any = trainer
    states: dict[str, list[Any]] = {}
    for cb in [*t.callback_handler.callbacks, t.control]:
        if isinstance(cb, ExportableState):
            states.setdefault(type(cb).__name__, []).append(cb.state())
    trainer_state = dataclasses.asdict(t.state)
    trainer_state["stateful_callbacks"] = {k: v[0] if len(v) == 1 else v for k, v in states.items()}
    tr_loss = t._tr_loss.detach().clone()
    total = t._total_loss_scalar
    if finished:
        # _finalize_training already added the last losses in and logged the run's
        # metrics: a rerun's _finalize_training does both again from this state.
        trainer_state["log_history"] = trainer_state["log_history"][:-1]
        tr_loss.zero_()
    ckpt: dict[str, Any] = {
        "trainer_state": trainer_state,
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.lr_scheduler.state_dict(),
        "logging": {
            "tr_loss": tr_loss,
            "total_loss_scalar": float(total),
            "globalstep_last_logged": int(t._globalstep_last_logged),
            "current_flos": float(t.current_flos),
        },
    }
    scaler = getattr(t.accelerator, "scaler", None)
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    return ckpt


class PliniusTrainerMixin:
    """Makes a ``Trainer`` class resume ``train()`` from its :class:`PliniusMirrorCallback`.

    Put it first: ``class MyTrainer(PliniusTrainerMixin, SomeTrainer)``.
    :class:`PliniusTrainer` is ``transformers.Trainer`` with it.
    """

    def _plinius(self) -> PliniusMirrorCallback:
        t: Any = self
        found = [cb for cb in t.callback_handler.callbacks if isinstance(cb, PliniusMirrorCallback)]
        if len(found) != 1:
            raise ConfigError(
                f"{type(self).__name__} needs exactly one PliniusMirrorCallback in its callbacks "
                f"(found {len(found)})"
            )
        return found[0]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, resuming from the mirror when it holds a state of this job."""
        t: Any = self
        if t.args.world_size > 1 or t.is_deepspeed_enabled or t.is_fsdp_enabled:
            raise ConfigError(
                "the plinius Trainer mirror supports single-process training only (no DeepSpeed, "
                "FSDP or several processes yet)"
            )
        cb = self._plinius()
        try:
            cb._open(t)
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            cb._close()

    def _inner_training_loop(
        self, batch_size: Any = None, args: Any = None, resume_from_checkpoint: Any = None,
        trial: Any = None, ignore_keys_for_eval: Any = None,
    ) -> Any:  # fmt: skip
        # Here, not in train(): train() may have built a new model (model_init).
        cb = self._plinius()
        if resume_from_checkpoint is None and cb._restore(self):  # type: ignore[arg-type]
            resume_from_checkpoint = _FromMirror(cb.path)
        return super()._inner_training_loop(  # type: ignore[misc]
            batch_size=batch_size, args=args, resume_from_checkpoint=resume_from_checkpoint,
            trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
        )  # fmt: skip

    def _init_training_state(
        self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
        resume_from_checkpoint: Any, trial: Any,
    ) -> tuple[int, int]:  # fmt: skip
        t: Any = self
        if not isinstance(resume_from_checkpoint, _FromMirror):
            return super()._init_training_state(  # type: ignore[misc,no-any-return]
                max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                trial,
            )  # fmt: skip
        super()._init_training_state(  # type: ignore[misc]
            max_steps, num_update_steps_per_epoch, num_train_epochs, None, trial
        )
        # What Trainer._init_training_state does with a checkpoint's trainer_state.json.
        loaded = self._plinius()._loaded
        assert loaded is not None
        t.state = TrainerState(**loaded["trainer_state"])
        best = t.state.best_model_checkpoint
        if best is not None and not os.path.isdir(best):
            t.state.best_model_checkpoint = None  # as the Trainer does: that checkpoint is gone
        compare_trainer_and_checkpoint_args(t.args, t.state)  # type: ignore[no-untyped-call]
        t._load_callback_state()
        epochs_trained = t.state.global_step // num_update_steps_per_epoch
        steps_in_epoch = 0
        if not t.args.ignore_data_skip:
            steps_in_epoch = t.state.global_step % num_update_steps_per_epoch
            steps_in_epoch *= t.args.gradient_accumulation_steps
        t.state.init_training_references(t, max_steps, num_train_epochs, trial)
        return int(epochs_trained), int(steps_in_epoch)

    def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
        if not isinstance(checkpoint, _FromMirror):
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
            return
        t: Any = self
        loaded = self._plinius()._loaded
        assert loaded is not None
        t.optimizer.load_state_dict(loaded["optimizer"])
        t.lr_scheduler.load_state_dict(loaded["scheduler"])

    def _load_scaler(self, checkpoint: Any) -> None:
        if not isinstance(checkpoint, _FromMirror):
            super()._load_scaler(checkpoint)  # type: ignore[misc]
            return
        t: Any = self
        loaded = self._plinius()._loaded
        assert loaded is not None
        if "scaler" in loaded and t.accelerator.scaler is not None:
            t.accelerator.scaler.load_state_dict(loaded["scaler"])

    def _load_rng_state(self, checkpoint: Any) -> None:
        if not isinstance(checkpoint, _FromMirror):
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
            return
        self._plinius()._rng.apply()


class PliniusTrainer(PliniusTrainerMixin, Trainer):  # type: ignore[misc]
    """``transformers.Trainer`` whose ``train()`` resumes from its mirror callback."""
