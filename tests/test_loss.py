import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.loss import TokenMetrics, micro_batch_loss, predicting_positions, token_stats
from sft_lightning.module import SFTLitModule
from sft_lightning.zero import loss_divisor
from tests.conftest import ROOT, TINY_QWEN

TRAIN = str(ROOT / "data" / "chatml_data.json")


def test_token_stats_sum_and_count_supervised_positions_only():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, -100]])
    positions = predicting_positions(labels)
    assert positions.tolist() == [0, 1]  # the logits the LM head computes: position 2 predicts nothing trained
    stats = token_stats(logits[:, positions], labels[:, positions + 1])
    assert token_stats(logits[:, :-1], labels[:, 1:]) == stats  # every position: the same numbers
    expected = sum(
        F.cross_entropy(logits[b, t - 1], labels[b, t], reduction="sum") for b, t in [(0, 1), (0, 2), (1, 2)]
    )
    assert stats.supervised_tokens == 3
    torch.testing.assert_close(stats.nll_sum, expected)


def test_micro_batch_loss_undoes_lightning_ddp_and_deepspeed_averaging():
    # 2 ranks x accumulation 4: Lightning divides by 4, DDP averages over 2; the step must see sum / 100.
    value = micro_batch_loss(torch.tensor(10.0), torch.tensor(100), loss_divisor(None, 4, 2))
    assert value / 4 / 2 == pytest.approx(10.0 / 100)
    # DeepSpeed's engine.backward divides by the accumulation count once more.
    value = micro_batch_loss(torch.tensor(10.0), torch.tensor(100), loss_divisor({"zero_optimization": {}}, 4, 2))
    assert value / 4 / 4 / 2 == pytest.approx(10.0 / 100)


def test_token_metrics_are_a_token_mean_not_a_mean_of_batch_means():
    metric = TokenMetrics()
    metric.update(token_stats(torch.zeros(1, 2, 4), torch.tensor([[1, 2]])))  # 2 tokens, nll ln 4 each
    logits = torch.zeros(1, 1, 4)
    logits[0, 0, 3] = 50.0
    metric.update(token_stats(logits, torch.tensor([[3]])))  # 1 token, nll ~0, correct
    values = metric.compute()
    assert values["loss"].item() == pytest.approx(2 * math.log(4) / 3, rel=1e-6)
    assert values["ppl"].item() == pytest.approx(math.exp(2 * math.log(4) / 3), rel=1e-6)
    assert values["acc"].item() == pytest.approx(1 / 3)


class GradientRecorder(L.Callback):
    """Rank 0 saves the gradient each optimizer step is about to apply (already all-reduced under DDP) to a
    file, so that runs in spawned processes report back too."""

    def __init__(self, path):
        self.path = path
        self.steps = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.steps.append({n: p.grad.detach().clone() for n, p in module.model.named_parameters()})

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero:
            torch.save(self.steps, self.path)


def train_gradients(
    tmp_path, batch_size: int, accumulate: int = 1, devices: int = 1, strategy: str = "auto", steps: int = 2,
    model: str = TINY_QWEN, lm_head_chunk_tokens: int | None = 512, **data_args,
) -> list[dict[str, torch.Tensor]]:
    L.seed_everything(0)
    module = SFTLitModule(model, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant",
                          lm_head_chunk_tokens=lm_head_chunk_tokens)
    data = ChatMLDataModule(train_path=TRAIN, tokenizer_path=model, batch_size=batch_size, max_length=64, seed=1,
                            cache_dir=None, **data_args)
    path = tmp_path / f"gradients-{batch_size}x{accumulate}x{devices}-{lm_head_chunk_tokens}-{sorted(data_args.items())}.pt"
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, accumulate_grad_batches=accumulate,
        logger=False, callbacks=[GradientRecorder(path)], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return torch.load(path, weights_only=True)


def assert_same_gradients(steps, reference):
    assert len(steps) == len(reference)
    for step, expected in zip(steps, reference):
        for name, grad in expected.items():
            # float32 summation order differs between the runs (and Adam amplifies it in later steps): the
            # tolerance is relative to the tensor scale, far below the ~10% a wrong normalisation gives
            scale = grad.abs().max().item()
            torch.testing.assert_close(step[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_batch_8_equals_batch_2_with_accumulation_4(monkeypatch, tmp_path):
    reference = train_gradients(tmp_path, batch_size=8)
    assert_same_gradients(train_gradients(tmp_path, batch_size=2, accumulate=4), reference)
    # The test can fail: a mean of micro-batch means (the usual mistake) gives another update, because the
    # micro-batches hold different numbers of supervised tokens.
    import sft_lightning.module as module_py

    last_count = []  # the micro-batch's own token count, kept here rather than on the package

    def mean_of_means(nll_sum, step_tokens, divisor):
        return nll_sum / nll_sum.new_tensor(last_count[-1])

    original = module_py.SFTLitModule.score

    def remember_count(self, batch):
        stats = original(self, batch)
        last_count.append(stats.supervised_tokens.item())
        return stats

    monkeypatch.setattr(module_py.SFTLitModule, "score", remember_count)
    monkeypatch.setattr(module_py, "micro_batch_loss", mean_of_means)
    with pytest.raises(AssertionError):
        assert_same_gradients(train_gradients(tmp_path, batch_size=2, accumulate=4), reference)


def test_packed_step_applies_the_same_gradient_as_unpacked(tmp_path):
    # One optimizer step over every training conversation, padded one per row or packed several per row.
    reference = train_gradients(tmp_path, batch_size=400, steps=1)
    assert_same_gradients(train_gradients(tmp_path, batch_size=400, steps=1, packing=True), reference)
    # and packed rows split over accumulation steps still give one token mean per step
    two_steps = train_gradients(tmp_path, batch_size=40, steps=2, packing=True)
    assert_same_gradients(train_gradients(tmp_path, batch_size=20, accumulate=2, steps=2, packing=True), two_steps)
