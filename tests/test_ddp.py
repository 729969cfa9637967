"""Two CPU processes (DDP, gloo) with batch 4 each apply the same gradients as one process with batch 8."""

import lightning as L
import pytest
import torch

from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.module import SFTLitModule
from tests.conftest import ROOT, TINY_QWEN
from tests.test_loss import assert_same_gradients

pytestmark = pytest.mark.slow
TRAIN = str(ROOT / "data" / "chatml_data.json")


class SaveGradients(L.Callback):
    """Rank 0 saves the (already all-reduced) gradients of each optimizer step to a file."""

    def __init__(self, path):
        self.path = path
        self.steps = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.steps.append({n: p.grad.detach().clone() for n, p in module.model.named_parameters()})

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero:
            torch.save(self.steps, self.path)


def gradients(tmp_path, devices: int, batch_size: int, strategy: str):
    path = tmp_path / f"grads-{devices}.pt"
    L.seed_everything(0)
    module = SFTLitModule(TINY_QWEN, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant")
    data = ChatMLDataModule(train_path=TRAIN, tokenizer_path=TINY_QWEN, batch_size=batch_size, max_length=64, seed=1)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=2, logger=False,
        callbacks=[SaveGradients(path)], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return torch.load(path, weights_only=True)


def test_two_ranks_batch_4_equal_one_rank_batch_8(tmp_path):
    reference = gradients(tmp_path, devices=1, batch_size=8, strategy="auto")
    assert_same_gradients(gradients(tmp_path, devices=2, batch_size=4, strategy="ddp_spawn"), reference)
