"""Train a small LightningModule with every optimizer step mirrored by plinius.

Run it, kill it (kill -9) whenever you like, run it again: it resumes from the
last mirrored step and ends with the same weights as a run never interrupted.

    plinius keygen owner.key
    python examples/lightning_mirror.py --key owner.key --mirror /dev/shm/lit.plm

Needs the ``lightning`` extra: pip install 'plinius[lightning]'.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any

import lightning.pytorch as L
import torch

from plinius.crypto import MasterKey
from plinius.errors import PliniusError
from plinius.integrations.lightning import (
    PliniusCheckpointIO,
    PliniusMirrorCallback,
    ResumableBatches,
)


class Regressor(L.LightningModule):
    """A two-layer MLP with dropout (so the random generators matter), Adam and a schedule."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(hidden, 1),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StepPrinter(L.Callback):
    """Prints each optimizer step once the mirror has committed it (for the crash test)."""

    def on_train_batch_end(
        self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        print(f"step {trainer.global_step} loss {outputs['loss'].item():.10g}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key", required=True, help="master key file (plinius keygen)")
    p.add_argument("--mirror", required=True, help="mirror file, e.g. /dev/shm/lit.plm")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--job", default="lightning-example")
    p.add_argument("--checkpoints", help="also keep encrypted ModelCheckpoint files here")
    p.add_argument("--weights-out", help="write the final weights here (torch.save)")
    args = p.parse_args(argv)
    try:
        key = MasterKey.load(args.key)
        torch.manual_seed(0)
        # The data is made here: 256 samples, 32 batches of 8 per epoch, no shuffle.
        x = torch.randn(256, 8)
        y = (x @ torch.linspace(-1, 1, 8)).unsqueeze(1) + 0.1 * torch.randn(256, 1)
        # ResumableBatches: Lightning's checkpoint then records the position in the epoch.
        data = ResumableBatches(
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        )
        mirror = PliniusMirrorCallback(args.mirror, key, job=args.job)
        trainer = L.Trainer(
            max_epochs=args.epochs,
            callbacks=[mirror, StepPrinter()],
            plugins=[PliniusCheckpointIO(key)],
            enable_checkpointing=args.checkpoints is not None,
            default_root_dir=args.checkpoints,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = Regressor(args.hidden)
        trainer.fit(model, data)
    except PliniusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(
        b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values())
    ).hexdigest()
    print(f"resumed-from {mirror.resumed_step} final-step {trainer.global_step} weights {digest}")
    if args.weights_out:
        torch.save(model.state_dict(), args.weights_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
