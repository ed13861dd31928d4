"""Train a tiny GPT-2 with the Hugging Face Trainer, every optimizer step mirrored by plinius.

Run it, kill it (kill -9) whenever you like, run it again: it resumes from the
last mirrored step and ends with the same weights and losses as a run never
interrupted. The model is built from a config and the data is made here: no
download, no hub access.

    plinius keygen owner.key
    python examples/hf_mirror.py --key owner.key --mirror /dev/shm/hf.plm

Needs the ``hf`` extra: pip install 'plinius[hf]'.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

from plinius.crypto import MasterKey
from plinius.errors import PliniusError
from plinius.integrations.hf import PliniusMirrorCallback, PliniusTrainer


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """256 sequences of 16 tokens from a small vocabulary: a pattern with noise."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        base = torch.arange(16) * 3 % 64
        self.ids = (base + torch.randint(0, 4, (256, 16), generator=g)) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepPrinter(TrainerCallback):  # type: ignore[misc]
    """Prints each step's logged loss (for the crash test)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            print(f"step {state.global_step} loss {logs['loss']!r}", flush=True)


def make_trainer(args: argparse.Namespace, key: MasterKey, output_dir: str) -> PliniusTrainer:
    """The model, the data and the Trainer, with the plinius mirror callback."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=args.embd, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg)  # dropout 0.1: the random generators matter
    targs = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=8,  # 32 batches per epoch
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=3e-3,
        warmup_steps=10,
        logging_steps=1,
        save_strategy="no",  # the mirror replaces the plaintext checkpoints
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    mirror = PliniusMirrorCallback(args.mirror, key, every_n_steps=args.every, job=args.job)
    return PliniusTrainer(
        model=model, args=targs, train_dataset=Tokens(), callbacks=[mirror, StepPrinter()]
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--key", required=True, help="master key file (plinius keygen)")
    p.add_argument("--mirror", required=True, help="mirror file, e.g. /dev/shm/hf.plm")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--embd", type=int, default=32, help="the model's width")
    p.add_argument("--every", type=int, default=1, help="mirror every K optimizer steps")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--job", default="hf-example")
    p.add_argument("--output-dir", help="the Trainer's output_dir (default: a temporary one)")
    return p.parse_args(argv)


def summary(trainer: PliniusTrainer, training_loss: float) -> str:
    """The final line: the resumed step, the weights' and losses' digests."""
    (mirror,) = (
        c for c in trainer.callback_handler.callbacks if isinstance(c, PliniusMirrorCallback)
    )
    weights = hashlib.sha256(
        b"".join(t.detach().numpy().tobytes() for t in trainer.model.state_dict().values())
    ).hexdigest()
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return (
        f"resumed-from {mirror.resumed_step} final-step {trainer.state.global_step} "
        f"weights {weights} losses {hashlib.sha256(repr(losses).encode()).hexdigest()} "
        f"train-loss {training_loss!r}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    transformers.logging.set_verbosity_error()  # the plinius error is the one line on stderr
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainer = make_trainer(args, MasterKey.load(args.key), args.output_dir or tmp)
            out = trainer.train()
        except PliniusError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(summary(trainer, out.training_loss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
