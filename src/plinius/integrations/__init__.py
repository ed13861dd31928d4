"""Plinius in the form training frameworks expect; each module is an optional extra.

* :mod:`plinius.integrations.lightning` (``plinius[lightning]``): a Lightning
  ``Callback`` that mirrors every optimizer step and resumes ``fit`` from the
  mirror, a ``CheckpointIO`` that encrypts ``ModelCheckpoint`` files, and
  ``ResumableBatches`` for an exact mid-epoch resume.
* :mod:`plinius.integrations.hf` (``plinius[hf]``): a Hugging Face
  ``TrainerCallback`` that mirrors every optimizer step, and a ``Trainer``
  mixin whose ``train()`` resumes from the mirror.

The DCP storage (``torch.distributed.checkpoint``) needs only torch and lives
in :mod:`plinius.dcp`. Nothing here is imported by ``import plinius``.
"""
