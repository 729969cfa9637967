import math

import pytest
import torch
import torch.nn.functional as F

from sft_lightning.collate import supervised_positions
from sft_lightning.loss import TokenMetrics, gather_supervised, micro_batch_loss, token_stats
from sft_lightning.layout import framework_divisor
from tests.helpers import assert_same_gradients, train_gradients


def test_token_stats_sum_and_count_supervised_positions_only():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, -100]])
    positions = supervised_positions(labels)
    assert positions.keep.tolist() == [0, 1]  # the logits the LM head computes: position 2 predicts nothing trained
    # of the kept (row, position) pairs (0,0) (0,1) (1,0) (1,1), row 1's position 0 predicts a masked label
    assert positions.index.tolist() == [0, 1, 3] and positions.targets.tolist() == [1, 2, 3]
    stats = token_stats(gather_supervised(logits[:, positions.keep], positions), positions.targets)
    expected = sum(
        F.cross_entropy(logits[b, t - 1], labels[b, t], reduction="sum") for b, t in [(0, 1), (0, 2), (1, 2)]
    )
    assert stats.supervised_tokens == 3
    torch.testing.assert_close(stats.nll_sum, expected)


def test_micro_batch_loss_undoes_lightning_ddp_and_deepspeed_averaging():
    # 2 ranks x accumulation 4: Lightning divides by 4, DDP averages over 2; the step must see sum / 100.
    value = micro_batch_loss(torch.tensor(10.0), torch.tensor(100), framework_divisor(False, 4, 2))
    assert value / 4 / 2 == pytest.approx(10.0 / 100)
    # DeepSpeed's engine.backward divides by the accumulation count once more.
    value = micro_batch_loss(torch.tensor(10.0), torch.tensor(100), framework_divisor(True, 4, 2))
    assert value / 4 / 4 / 2 == pytest.approx(10.0 / 100)


def test_token_metrics_are_a_token_mean_not_a_mean_of_batch_means():
    metric = TokenMetrics()
    metric.update(token_stats(torch.zeros(2, 4), torch.tensor([1, 2])))  # 2 tokens, nll ln 4 each
    logits = torch.zeros(1, 4)
    logits[0, 3] = 50.0
    metric.update(token_stats(logits, torch.tensor([3])))  # 1 token, nll ~0, correct
    values = metric.compute()
    assert values["loss"].item() == pytest.approx(2 * math.log(4) / 3, rel=1e-6)
    assert values["ppl"].item() == pytest.approx(math.exp(2 * math.log(4) / 3), rel=1e-6)
    assert values["acc"].item() == pytest.approx(1 / 3)


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
        last_count.append(stats.supervised_tokens)
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
