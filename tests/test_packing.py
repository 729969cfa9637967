"""Packing: exact rows and tensors, and packed samples computing exactly what they compute alone."""

import importlib.util
from collections import Counter

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
from sft_lightning.varlen import VarlenKernel, _cuda_varlen_kernel, run_varlen
from tests.helpers import packed_logit_mismatch
from tests.strict_kernels import installed_varlen_attn, reference_attention, strict_varlen_attn

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
    assert batch.counts == (3, 9, 6, 14, 4 * 4 + 3 * 3 + 2 * 2)  # samples, tokens, supervised, slots, sum of squares
    # Where the LM head runs, rows as they are (positions 0-5 predict a label in row 1; position 0 in row 2) ...
    assert batch.supervision_rows.keep.tolist() == [0, 1, 2, 4, 5]
    assert batch.supervision_rows.index.tolist() == [0, 1, 2, 3, 4, 5]
    assert batch.supervision_rows.targets.tolist() == [6, 7, 8, 10, 11, 13]
    # ... and laid end to end: exactly the supervised positions, each with its target
    assert batch.supervision_flat.keep.tolist() == [0, 1, 2, 4, 5, 7]
    assert batch.supervision_flat.index.tolist() == list(range(6))
    assert batch.supervision_flat.targets.tolist() == [6, 7, 8, 10, 11, 13]
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
    inputs, _ = packed_model_inputs(batch, attn)
    row_length = batch.input_ids.shape[1]
    labels = batch.labels.reshape(-1)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.reshape(-1, model.config.vocab_size)
        for row, row_samples in enumerate(rows):
            start = row * row_length
            for ids, sample_labels in row_samples:
                span = torch.arange(start, start + len(ids) - 1)
                targets = labels[start + 1 : start + len(ids)]
                packed = token_stats(logits[span[targets != X]], targets[targets != X])
                alone = model(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0, :-1]
                single_targets = torch.as_tensor(sample_labels)[1:]
                single = token_stats(alone[single_targets != X], single_targets[single_targets != X])
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
    import sft_lightning.attention as attention_py

    real = attention_py.cross_sample_influence
    # Simulate a backend that ignores the sample boundaries (as above), at the check in the first packed forward.
    monkeypatch.setattr(attention_py, "cross_sample_influence", lambda model, first, second, attn: real(model, first, second, SDPA_VARLEN))
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exited:
        cli_main(["fit", "--config", "configs/tiny.yaml", "--model.attn_implementation=sdpa", "--data.packing=true",
                  f"--trainer.default_root_dir={tmp_path}", f"--data.cache_dir={tmp_path / 'cache'}"])
    assert exited.value.code == 2
    assert "packed samples attend to each other with attn_implementation=sdpa" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


# The signatures of torch.nn.attention.varlen.varlen_attn in the releases before the installed one (see
# sft_lightning/varlen.py); the stand-in binds every call against the one it is given.
def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None): ...


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)): ...


SIGNATURES = {"installed": installed_varlen_attn, "2.10": varlen_attn_2_10, "2.11": varlen_attn_2_11}


def kernel_and_loop_logits(model, inputs, monkeypatch, signature=installed_varlen_attn):
    """The model's logits with the strict stand-in as the kernel, and with the per-sample loop; and the calls."""
    import sft_lightning.attention as attention

    calls = Counter()
    with torch.no_grad():
        loop = model(**inputs, use_cache=False).logits
        kernel = VarlenKernel.of(strict_varlen_attn(signature, calls))
        monkeypatch.setattr(attention, "varlen_kernel", lambda device: kernel)
        return model(**inputs, use_cache=False).logits, loop, calls


@pytest.mark.parametrize("model_dir", [TINY_QWEN, TINY_LLAMA], ids=["qwen2", "llama"])
@pytest.mark.parametrize("signature", SIGNATURES)
@pytest.mark.parametrize("precision", ["bf16-autocast", "fp16-autocast", "bf16-weights", "fp16-weights"])
def test_one_varlen_kernel_call_per_layer_in_every_precision_and_signature(model_dir, signature, precision, monkeypatch):
    # float32 weights under bf16 (fp16) autocast are what bf16-mixed (16-mixed) trains: RoPE leaves q/k in float32
    # while v is half, which the kernel refuses unless they are brought to one half dtype first. Both tiny models use
    # GQA.
    half = torch.float16 if precision.startswith("fp16") else torch.bfloat16
    autocast = precision.endswith("autocast")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=SDPA_VARLEN,
                                                 dtype=torch.float32 if autocast else half).eval()
    samples = chat_samples(model_dir)
    inputs, _ = packed_model_inputs(collate_packed([samples[:3], samples[3:]], pad_token_id=0), SDPA_VARLEN)
    with torch.autocast("cpu", dtype=half, enabled=autocast):
        kernel, loop, calls = kernel_and_loop_logits(model, inputs, monkeypatch, SIGNATURES[signature])
    assert calls == {str(half): model.config.num_hidden_layers}  # one call per layer for the whole batch
    torch.testing.assert_close(kernel.float(), loop.float(), rtol=0, atol=0.05 * loop.float().abs().max().item())


def test_float32_without_autocast_runs_the_per_sample_loop(monkeypatch):
    # The kernel takes no float32 (32-true on a GPU): the samples run one by one, never a kernel error.
    model = AutoModelForCausalLM.from_pretrained(TINY_QWEN, attn_implementation=SDPA_VARLEN).eval()
    inputs, _ = packed_model_inputs(collate_packed([chat_samples(TINY_QWEN)], pad_token_id=0), SDPA_VARLEN)
    kernel, loop, calls = kernel_and_loop_logits(model, inputs, monkeypatch)
    assert not calls
    torch.testing.assert_close(kernel, loop, rtol=0, atol=0)


@pytest.mark.parametrize("signature", SIGNATURES)
def test_a_scale_and_a_window_reach_every_signature_or_fall_back(signature):
    torch.manual_seed(0)
    query, key, value = torch.randn(9, 4, 8, dtype=torch.bfloat16), *torch.randn(2, 9, 2, 8, dtype=torch.bfloat16)
    bounds = torch.tensor([0, 5, 9], dtype=torch.int32)
    kernel = VarlenKernel.of(strict_varlen_attn(SIGNATURES[signature]))
    expected = reference_attention(query, key, value, bounds, 0.3, (-1, 0))
    # A scale that is not 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar): 2.10 has no `scale`, so q is pre-scaled.
    got = run_varlen(kernel, query, key, value, bounds, 5, 0.3, None)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0.02)
    windowed = run_varlen(kernel, query, key, value, bounds, 5, None, 2)
    if signature == "2.10":
        assert windowed is None  # no window_size before 2.11: the caller runs the loop
    else:
        torch.testing.assert_close(windowed, reference_attention(query, key, value, bounds, None, (1, 0)), rtol=0, atol=0.02)


def test_the_strict_stand_in_refuses_what_the_kernel_refuses():
    query = torch.randn(9, 4, 8, dtype=torch.bfloat16)
    bounds = torch.tensor([0, 5, 9], dtype=torch.int32)
    strict = strict_varlen_attn()
    causal = {"window_size": (-1, 0)}
    with pytest.raises(RuntimeError, match="only support fp16 and bf16"):
        strict(query.float(), query.float(), query.float(), bounds, bounds, 5, 5, **causal)
    with pytest.raises(RuntimeError, match="query and key must have the same dtype"):
        strict(query, query.float(), query, bounds, bounds, 5, 5, **causal)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must have dtype int32"):
        strict(query, query, query, bounds.long(), bounds.long(), 5, 5, **causal)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        transposed = torch.randn(9, 8, 4, dtype=torch.bfloat16).transpose(1, 2)
        strict(transposed, transposed, transposed, bounds, bounds, 5, 5, **causal)
    with pytest.raises(ValueError, match="Try setting enable_gqa=True"):
        strict(query, query[:, :2], query[:, :2], bounds, bounds, 5, 5, **causal)
    with pytest.raises(TypeError):  # 2.11 has no enable_gqa: the call that broke every packed run on torch 2.11
        strict_varlen_attn(varlen_attn_2_11)(query, query[:, :2], query[:, :2], bounds, bounds, 5, 5, enable_gqa=True)


def test_no_kernel_before_ampere_or_before_torch_2_10_says_so_in_one_line(monkeypatch, caplog):
    import sys

    _cuda_varlen_kernel.cache_clear()
    has_kernel = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    assert _cuda_varlen_kernel((8, 0)) == (VarlenKernel.of(installed_varlen_attn) if has_kernel else None)
    assert _cuda_varlen_kernel((7, 5)) is None
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # as on torch 2.9: an ImportError
    _cuda_varlen_kernel.cache_clear()
    assert _cuda_varlen_kernel((9, 0)) is None
    _cuda_varlen_kernel.cache_clear()
    lines = caplog.text.splitlines()  # rank_zero_info logs
    assert any("(sm75) predates FlashAttention (sm80)" in line for line in lines)
    assert any("has no variable-length attention kernel" in line for line in lines)
