"""The LM head and the loss in chunks equal the whole-logits path: loss, gradients and evaluation metrics."""

import pytest
import torch
import torch.nn.functional as F

from sft_lightning.collate import collate_training
from sft_lightning.collate import SupervisedPositions
from sft_lightning.lm_head import CHUNK_ABOVE_MB, ChunkedCrossEntropy, ChunkedLMHead, install_chunked_head, logits_bytes
from sft_lightning.module import SFTLitModule
from tests.conftest import TINY_LLAMA, TINY_QWEN
from tests.helpers import assert_same_gradients, train_gradients


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cross_entropy_equals_the_whole_logits(bias):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    offset = torch.randn(101, requires_grad=True) if bias else None
    targets = torch.randint(0, 101, (37,))
    nll, correct = ChunkedCrossEntropy.apply(hidden, weight, offset, targets, 8)  # 8 does not divide 37
    (0.5 * nll).backward()
    chunked = [t.grad.clone() for t in (hidden, weight, offset) if t is not None]
    for tensor in (hidden, weight, offset):
        if tensor is not None:
            tensor.grad = None
    logits = F.linear(hidden, weight, offset).float()
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (0.5 * reference).backward()
    torch.testing.assert_close(nll, reference, rtol=1e-6, atol=0)
    assert correct == (logits.argmax(dim=-1) == targets).sum()
    for got, tensor in zip(chunked, [t for t in (hidden, weight, offset) if t is not None]):
        torch.testing.assert_close(got, tensor.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model, packing", [(TINY_QWEN, False), (TINY_LLAMA, True)], ids=["tied-padded", "untied-packed"])
def test_chunked_training_gradients_equal_unchunked(tmp_path, model, packing):
    # 5 positions a chunk: every micro-batch spans several chunks; accumulation 2 over 2 optimizer steps. And by
    # default, the tiny vocabulary's logits below lm_head_chunk_above_mb: scored whole, the same again.
    common = dict(batch_size=8, accumulate=2, model=model, packing=packing)
    reference = train_gradients(tmp_path, lm_head_chunk_tokens=None, **common)
    assert_same_gradients(train_gradients(tmp_path, lm_head_chunk_tokens=5, **common), reference)
    assert_same_gradients(train_gradients(tmp_path, lm_head_chunk_tokens=5, lm_head_chunk_above_mb=CHUNK_ABOVE_MB,
                                          **common), reference)


def test_the_head_runs_in_chunks_only_where_the_logits_are_larger_than_chunk_above(monkeypatch):
    head = torch.nn.Linear(16, 101)
    calls = []
    original = ChunkedCrossEntropy.apply
    monkeypatch.setattr(ChunkedCrossEntropy, "apply", lambda *args: calls.append(args) or original(*args))
    hidden, targets = torch.randn(1, 37, 16), torch.randint(0, 101, (37,))
    positions = SupervisedPositions(torch.arange(36), torch.arange(36), targets[1:])
    scores = {}
    for above in (logits_bytes(36, 101, 4), logits_bytes(36, 101, 4) - 1):  # float32: 36 x 101 x 12 bytes
        head.__class__, head.chunk_tokens, head.chunk_above_bytes = ChunkedLMHead, 8, above
        with head.scoring(positions, every_position=True):
            scores[len(calls)] = head(hidden)
    assert len(calls) == 1  # whole at exactly the limit, in chunks one byte below it
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-6, atol=0)


def test_chunked_evaluation_metrics_equal_unchunked():
    batch_of = None
    stats = {}
    for chunk in (None, 3):
        module = SFTLitModule(TINY_QWEN, lm_head_chunk_tokens=chunk, lm_head_chunk_above_mb=0)
        module.configure_model()
        assert isinstance(module.model.get_output_embeddings(), ChunkedLMHead) == (chunk is not None)
        if batch_of is None:
            ids = module.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])["input_ids"]
            labels = [-100] * (len(ids) - 4) + ids[-4:]
            batch_of = collate_training([ids], [labels], module.tokenizer.pad_token_id)
        with torch.no_grad():
            stats[chunk] = module.score(batch_of)
    torch.testing.assert_close(stats[3].nll_sum, stats[None].nll_sum, rtol=1e-6, atol=0)
    assert stats[3].supervised_tokens == stats[None].supervised_tokens and stats[3].correct == stats[None].correct
    # Outside scoring the head is the plain layer: generation, chat and export see logits.
    head = module.model.get_output_embeddings()
    assert head(torch.zeros(1, 2, head.in_features)).shape == (1, 2, head.out_features)


def test_a_model_that_transforms_its_logits_keeps_the_whole_head():
    model = SFTLitModule(TINY_QWEN, lm_head_chunk_tokens=None)
    model.configure_model()
    model.model.config.final_logit_softcapping = 30.0  # Gemma 2's tanh soft-capping after the head
    assert install_chunked_head(model.model, 64) == "the model transforms its logits after the head (final_logit_softcapping)"
    assert type(model.model.get_output_embeddings()) is torch.nn.Linear
