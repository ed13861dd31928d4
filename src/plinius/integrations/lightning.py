"""PyTorch Lightning: mirror every optimizer step into plinius, resume from it on fit start.

::

    from plinius.integrations.lightning import PliniusCheckpointIO, PliniusMirrorCallback

    trainer = L.Trainer(
        callbacks=[PliniusMirrorCallback("/dev/shm/job.plm", key)],
        plugins=[PliniusCheckpointIO(key)],   # ModelCheckpoint files encrypted too
    )
    trainer.fit(model, datamodule)            # after a crash: the same lines resume

:class:`PliniusMirrorCallback` saves, after every K-th optimizer step
(``on_train_batch_end``), Lightning's own checkpoint dict (the loops'
progress, optimizers, schedulers, callbacks' states) with the module itself
and the global random generators, as one committed generation of a
:class:`~plinius.mirror.Mirror`. When ``fit`` starts and the mirror holds a
state, it restores it before Lightning restores a checkpoint, and hands
Lightning that dict as the checkpoint to resume from; the random generators are
put back just before the first resumed batch. What Lightning's checkpoint
does not hold is not restored: a DataLoader's position mid-epoch is restored
only when the loader is stateful (``state_dict``/``load_state_dict``), as with
Lightning's own checkpoints; a shuffling sampler without its own generator
draws its order from the global generator when its epoch starts.

Requires the ``lightning`` extra (``pip install 'plinius[lightning]'``).
Relies on Lightning's checkpoint connector (``dump_checkpoint`` and the
loaded-checkpoint slot), tested with lightning 2.6.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from .._fsutil import temp_prefix
from ..counters import Counter
from ..crypto import MasterKey
from ..errors import ConfigError, FormatError, StorageError
from ..mirror import Mirror
from ._common import DictState, MirrorSettings, job_state, restore_dict, resume_job

__all__ = ["PliniusCheckpointIO", "PliniusMirrorCallback", "ResumableBatches"]

_HOLDER = "lightning"


def _job(pl_module: pl.LightningModule, name: str | None) -> dict[str, Any]:
    cls = type(pl_module)
    return {
        "framework": "lightning",
        "module": f"{cls.__module__}.{cls.__qualname__}",
        "name": name or "",
    }


class PliniusMirrorCallback(MirrorSettings, pl.Callback):
    """Mirror Lightning's training state after every ``every_n_steps`` optimizer steps.

    Args:
        path: the mirror file (``/dev/shm/...`` for emulated persistent memory).
        key: the master key.
        every_n_steps: mirror after every K-th optimizer step.
        job: a name for this job, recorded and checked on resume (a mirror of
            another job, or of another LightningModule class, is refused).
        counter: a freshness counter (:mod:`plinius.counters`) for the mirror.

    On resume, ``fit`` stops with the plinius error (nothing overwritten) when
    the key is wrong (``WrongKeyError``), the mirror is another job's or the
    module's parameters changed (``StateMismatchError``), or the mirror fails
    authentication (``IntegrityError``).
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
        self.resumed_step: int | None = None

    # The mirror is this callback's state; Lightning's checkpoints need none of it.
    def state_dict(self) -> dict[str, Any]:
        """Nothing: the callback keeps no state in Lightning's checkpoints."""
        return {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Open the mirror; if it holds a state, restore it and give it to Lightning to resume."""
        if stage != "fit":
            return
        self._mirror = Mirror(self.path, self._key, counter=self._counter)
        try:
            job = _job(pl_module, self._name)
            step, ckpt = resume_job(self._mirror, job, pl_module, _HOLDER, self._rng, self.path)
            if ckpt is None:
                return
            # The module was restored in place (strictly: same keys, shapes, dtypes);
            # Lightning loads the checkpoint's state_dict into it again.
            ckpt["state_dict"] = pl_module.state_dict()
            # Lightning resumes from the checkpoint in this slot (filled by
            # resume_start when a ckpt_path is given: an explicit one wins).
            trainer._checkpoint_connector._loaded_checkpoint = ckpt
            self.resumed_step = step
        except BaseException:
            # Lightning does not tear callbacks down when setup fails: release
            # the mirror (and its lock) here; nothing was written to it.
            self._mirror.close()
            self._mirror = None
            raise

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Put the saved random generators back just before the first resumed batch."""
        self._rng.apply()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """After the optimizer step: commit the state every K steps."""
        if self._mirror is None or trainer.global_step % self._every:
            return
        self._mirror.save(self._state(trainer, pl_module), step=trainer.global_step)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the mirror when fit fails (its last commit stays)."""
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Close the mirror."""
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None

    def _state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        ckpt = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        ckpt.pop("state_dict", None)  # saved once, as the module itself
        return job_state(_job(pl_module, self._name), pl_module, _HOLDER, ckpt, self._rng)


class ResumableBatches:
    """A DataLoader whose position Lightning's checkpoint records, for an exact mid-epoch resume.

    Lightning saves the state of a stateful loader (``state_dict``) with its
    loops and, on resume, hands it back before iterating; a plain DataLoader
    would start the interrupted epoch from its first batch again. Wrap a loader
    whose order depends only on the epoch (no shuffling, or a sampler seeded
    per epoch)::

        trainer.fit(model, ResumableBatches(DataLoader(dataset, batch_size=8)))

    The wrapped loader must have a length: Lightning's fetcher then draws no
    batch ahead, so the batches drawn when a checkpoint is taken are exactly
    those trained on. On resume the skipped batches are drawn and discarded.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._skip = 0
        self._drawn = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._drawn = 0
        it = iter(self.loader)
        for _ in range(skip):
            next(it)
            self._drawn += 1
        for batch in it:
            self._drawn += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The number of batches of this epoch trained on."""
        return {"batches": self._drawn}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Skip the batches already trained on when the epoch is iterated again."""
        n = int(sd["batches"])
        # A save after the epoch's last batch resumes at the next epoch's start.
        self._skip = n if 0 < n < len(self) else 0


class PliniusCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO``: every checkpoint file is a plinius mirror file, encrypted.

    ``ModelCheckpoint`` and ``trainer.save_checkpoint`` write through it; a file
    is built under a temporary name and renamed over the old one, so a crash
    leaves the old checkpoint or the new one.

    Args:
        key: the master key.
    """

    def __init__(self, key: MasterKey) -> None:
        if not isinstance(key, MasterKey):
            raise ConfigError("key must be a plinius MasterKey (MasterKey.load(path))")
        self._key = key

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Encrypt ``checkpoint`` into a new mirror file at ``path`` (atomically replaced)."""
        if storage_options is not None:
            raise ConfigError("PliniusCheckpointIO takes no storage_options")
        final = Path(path)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {final.parent}: {exc.strerror}") from exc
        tmp = final.with_name(f"{temp_prefix(final)}{secrets.token_hex(4)}.tmp")
        try:
            ckpt = dict(checkpoint)
            with Mirror(tmp, self._key) as m:
                m.save(
                    {_HOLDER: DictState(lambda: ckpt), _HOLDER + "_keys": list(ckpt)},
                    step=int(ckpt.get("global_step", 0)),
                )
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Authenticate and decrypt the checkpoint at ``path`` (tensors on the CPU)."""
        p = Path(path)
        if not p.is_file():
            raise StorageError(f"checkpoint {p} does not exist; check the path")
        with Mirror(p, self._key, readonly=True) as m:
            _, ckpt = restore_dict(m, {}, _HOLDER)
        if ckpt is None:
            raise FormatError(f"{p} is a plinius mirror without a Lightning checkpoint")
        return ckpt

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint file."""
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
