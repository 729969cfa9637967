"""Packing: exact rows and tensors, and packed samples computing exactly what they compute alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sft_lightning.attention import SDPA_VARLEN, cross_sample_influence, packed_model_inputs
from sft_lightning.cli import cli_main
from sft_lightning.loss import token_stats
from sft_lightning.packing import collate_packed, pack_best_fit_decreasing
from sft_lightning.render import IGNORE_INDEX, load_tokenizer
from sft_lightning.tokenized import tokenize_split
from tests.conftest import ROOT, TINY_LLAMA, TINY_QWEN
from tests.helpers import packed_logit_mismatch

X = IGNORE_INDEX


def test_best_fit_decreasing_rows():
    assert pack_best_fit_decreasing([5, 3, 7, 2, 2, 1], capacity=8) == [[2, 5], [0, 1], [3, 4]]
    lengths = [(i * 37) % 101 + 1 for i in range(500)]
    rows = pack_best_fit_decreasing(lengths, capacity=128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert max(sum(lengths[i] for i in row) for row in rows) <= 128
    assert len(rows) <= sum(lengths) / 128 * 1.05  # within 5% of a perfect fill
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        pack_best_fit_decreasing([3, 9], capacity=8)


def test_collate_packed_tensors():
    # The second sample's first label is a real token on purpose: packing must mask it all the same.
    rows = [[([5, 6, 7, 8], [X, 6, 7, 8]), ([9, 10, 11], [10, 10, 11])], [([12, 13], [X, 13])]]
    batch = collate_packed(rows, pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11], [12, 13, 0, 0, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    assert batch.labels.tolist() == [[X, 6, 7, 8, X, 10, 11], [X, 13, X, X, X, X, X]]
    assert batch.cu_seq_lens.tolist() == [0, 4, 7, 9, 14]  # rows end to end; row 2's padding is a segment
    assert batch.max_seq_len == 5  # a plain int, computed once for every layer's kernel
    assert batch.sample_lengths.tolist() == [4, 3, 2]
    assert not hasattr(batch, "attention_mask")  # packed rows have no padding mask: positions separate them


def chat_samples(model_dir, count=6):
    split = tokenize_split(str(ROOT / "data" / "chatml_data.json"), load_tokenizer(model_dir), 256, "assistant")
    return [split.sample(i) for i in range(count)]


@pytest.mark.parametrize("model_dir", [TINY_QWEN, TINY_LLAMA], ids=["qwen2", "llama"])
@pytest.mark.parametrize("attn", [SDPA_VARLEN, "sdpa", "eager"])
def test_packed_logits_and_losses_equal_one_by_one(model_dir, attn):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn).eval()
    samples = chat_samples(model_dir)
    assert packed_logit_mismatch(model, samples, attn) < 1e-5
    # Per-sample losses through the training loss path, two rows of three samples.
    rows = [samples[:3], samples[3:]]
    batch = collate_packed(rows, pad_token_id=0)
    inputs, labels = packed_model_inputs(batch, attn)
    row_length = batch.input_ids.shape[1]
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.reshape(-1, model.config.vocab_size)
        labels = labels.reshape(-1)
        for row, row_samples in enumerate(rows):
            start = row * row_length
            for ids, sample_labels in row_samples:
                span = slice(start, start + len(ids) - 1)
                packed = token_stats(logits[span], labels[start + 1 : start + len(ids)])
                alone = model(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0, :-1]
                single = token_stats(alone, torch.as_tensor(sample_labels)[1:])
                assert packed.supervised_tokens == single.supervised_tokens > 0
                torch.testing.assert_close(packed.nll_sum, single.nll_sum, atol=1e-5, rtol=1e-6)
                start += len(ids)


def check_spans(model_dir):
    """Two spans of real conversation tokens, as the check takes them from a batch."""
    tokens = torch.tensor([t for ids, _ in chat_samples(model_dir) for t in ids])
    return tokens[:40], tokens[40:80]


@pytest.mark.parametrize("model_dir", [TINY_QWEN, TINY_LLAMA], ids=["qwen2", "llama"])
@pytest.mark.parametrize("attn", [SDPA_VARLEN, "sdpa", "eager"])
def test_the_check_finds_no_influence_between_packed_samples(model_dir, attn):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn).eval()
    with torch.no_grad():
        assert cross_sample_influence(model, *check_spans(model_dir), attn).item() == 0.0  # exactly: same kernels
        half = model.to(torch.bfloat16)
        assert cross_sample_influence(half, *check_spans(model_dir), attn).item() == 0.0  # in half precision too


def test_the_check_catches_samples_that_see_each_other():
    # A model on plain sdpa given the inputs prepared for sdpa_varlen: the all-ones mask with nothing honouring
    # the sample boundaries is exactly the silent failure the check exists for.
    model = AutoModelForCausalLM.from_pretrained(TINY_QWEN, attn_implementation="sdpa").eval()
    assert packed_logit_mismatch(model, chat_samples(TINY_QWEN), SDPA_VARLEN) > 1e-2
    with torch.no_grad():
        assert cross_sample_influence(model, *check_spans(TINY_QWEN), SDPA_VARLEN).item() > 1e-2


def test_transformers_default_cache_mixes_packed_samples():
    # Why every packed forward passes use_cache=False: with a cache, transformers skips the packed-sample mask.
    model = AutoModelForCausalLM.from_pretrained(TINY_QWEN, attn_implementation="sdpa").train()
    (first, _), (second, _) = chat_samples(TINY_QWEN, 2)
    ids = torch.tensor([list(first) + list(second)])
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    alone = model(input_ids=torch.tensor([list(second)]), use_cache=False).logits[0]
    with torch.no_grad():
        leaky = model(input_ids=ids, position_ids=positions).logits[0, len(first) :]
        exact = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, len(first) :]
    assert (leaky - alone).abs().max() > 1e-2
    torch.testing.assert_close(exact, alone.detach(), atol=1e-5, rtol=0)


def test_fit_refuses_to_pack_when_samples_mix(monkeypatch, tmp_path, capsys):
    import sft_lightning.module as module_py

    real = module_py.cross_sample_influence
    # Simulate a backend that ignores the sample boundaries (as above), at the check in the first packed forward.
    monkeypatch.setattr(module_py, "cross_sample_influence", lambda model, first, second, attn: real(model, first, second, SDPA_VARLEN))
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exited:
        cli_main(["fit", "--config", "configs/tiny.yaml", "--model.attn_implementation=sdpa", "--data.packing=true",
                  f"--trainer.default_root_dir={tmp_path}", f"--data.cache_dir={tmp_path / 'cache'}"])
    assert exited.value.code == 2
    assert "packed samples attend to each other with attn_implementation=sdpa" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's contract, written out with explicit softmax attention (the real
    kernel is CUDA only): (tokens, heads, dim) inputs, samples given by the boundaries."""
    assert cu_seq_q is cu_seq_k and window_size == (-1, 0) and isinstance(max_q, int)
    ends = cu_seq_q.tolist()
    assert max_q == max(b - a for a, b in zip(ends, ends[1:]))
    if enable_gqa:
        key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    output = torch.empty_like(query)
    for start, end in zip(ends, ends[1:]):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (heads, tokens, dim)
        scores = q @ k.transpose(1, 2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        output[start:end] = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v).transpose(0, 1)
    return output


@pytest.mark.parametrize("model_dir", [TINY_QWEN, TINY_LLAMA], ids=["qwen2", "llama"])
def test_one_varlen_kernel_call_per_layer_equals_the_per_sample_loop(model_dir, monkeypatch):
    import sft_lightning.attention as attention

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=SDPA_VARLEN).eval()
    samples = chat_samples(model_dir)
    batch = collate_packed([samples[:3], samples[3:]], pad_token_id=0)
    inputs, _ = packed_model_inputs(batch, SDPA_VARLEN)
    with torch.no_grad():
        loop = model(**inputs, use_cache=False).logits
        calls = []
        monkeypatch.setattr(attention, "varlen_kernel", lambda device: lambda *a, **k: calls.append(1) or reference_varlen_attn(*a, **k))
        kernel = model(**inputs, use_cache=False).logits
    assert len(calls) == model.config.num_hidden_layers  # one call per layer for the whole batch
    torch.testing.assert_close(kernel, loop, rtol=1e-5, atol=1e-5)
