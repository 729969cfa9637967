"""One line at the end of ``fit``: how the training loss moved and the validation loss of every epoch."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info


class FitSummary(Callback):
    """Prints ``train_loss: A (step a) -> B (step b); val_loss by epoch: ...`` on global rank 0 when fit ends."""

    def __init__(self) -> None:
        # (optimizer step, loss) when first and last logged: the loss stays a tensor until the end, since reading it
        # every step would wait for the GPU every step.
        self.first: Optional[tuple[int, torch.Tensor]] = None
        self.last: Optional[tuple[int, torch.Tensor]] = None
        self.val_losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None and (self.last is None or self.last[0] != trainer.global_step):
            self.last = (trainer.global_step, loss)
            self.first = self.first or self.last

    def on_validation_end(self, trainer, pl_module) -> None:  # after the epoch's metrics reach callback_metrics
        if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val_loss"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.first is None:
            return
        (first_step, first), (last_step, last) = self.first, self.last
        line = f"train_loss: {float(first):.3f} (step {first_step}) -> {float(last):.3f} (step {last_step})"
        if self.val_losses:
            line += "; val_loss by epoch: " + " ".join(f"{loss:.3f}" for loss in self.val_losses)
        rank_zero_info(line)
