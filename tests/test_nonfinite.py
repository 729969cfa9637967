"""A NaN or infinite loss or gradient skips that optimizer step; too many in a row stop the run clearly."""

import lightning as L
import pytest
import torch

from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.errors import NonFiniteError
from sft_lightning.module import SFTLitModule
from sft_lightning.layout import ConnectRunLayout
from tests.conftest import ROOT, TINY_QWEN


class PoisonedModule(SFTLitModule):
    """Test helper: the backward of the optimizer steps in ``poison`` (0-based) is NaN."""

    def __init__(self, *args, poison=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poison = set(poison)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step in self.poison else loss


class WeightsAfterEachStep(L.Callback):
    def __init__(self) -> None:
        self.weights = {}

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.weights[trainer.global_step] = module.model.lm_head.weight.detach().clone()


def train(poison, patience=5, steps=8):
    L.seed_everything(0)
    module = PoisonedModule(TINY_QWEN, learning_rate=1e-3, warmup_ratio=0.0, poison=poison, nonfinite_patience=patience)
    data = ChatMLDataModule(train_path=str(ROOT / "data" / "chatml_data.json"), tokenizer_path=TINY_QWEN,
                            batch_size=16, max_length=64, cache_dir=None)
    weights = WeightsAfterEachStep()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ConnectRunLayout(module, data), weights])
    trainer.fit(module, data)
    return trainer, weights.weights


def test_nonfinite_steps_are_skipped_and_counted():
    trainer, weights = train(poison={3, 4})
    assert trainer.global_step == 8
    assert trainer.callback_metrics["train_nonfinite_steps"].item() == 2
    torch.testing.assert_close(weights[4], weights[3], rtol=0, atol=0)  # step 3 changed nothing
    torch.testing.assert_close(weights[5], weights[3], rtol=0, atol=0)  # nor step 4
    assert not torch.equal(weights[6], weights[5])  # and training went on
    assert torch.isfinite(weights[8]).all()


def test_too_many_in_a_row_stop_the_run():
    with pytest.raises(NonFiniteError, match=r"^3 optimizer steps in a row \(to step 5\) had a NaN or infinite"):
        train(poison={2, 3, 4}, patience=3)
