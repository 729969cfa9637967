"""One line at the end of ``fit``: how the training loss moved and the validation loss of every epoch."""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info


class FitSummary(Callback):
    """Prints ``train_loss: A (step a) -> B (step b); val_loss by epoch: ...`` on global rank 0 when fit ends."""

    def __init__(self) -> None:
        self.train_losses: list[tuple[int, float]] = []  # (optimizer step, loss) each time it was logged
        self.val_losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None and (not self.train_losses or self.train_losses[-1][0] != trainer.global_step):
            self.train_losses.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer, pl_module) -> None:  # after the epoch's metrics reach callback_metrics
        if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val_loss"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.train_losses:
            return
        (first_step, first), (last_step, last) = self.train_losses[0], self.train_losses[-1]
        line = f"train_loss: {first:.3f} (step {first_step}) -> {last:.3f} (step {last_step})"
        if self.val_losses:
            line += "; val_loss by epoch: " + " ".join(f"{loss:.3f}" for loss in self.val_losses)
        rank_zero_info(line)
