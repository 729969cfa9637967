"""Packed rows through Qwen3.5's Gated DeltaNet layers: the convolution window and the recurrent state restart at every
sample start, on the CPU (the layer's own torch rule per sample) and through flash-linear-attention's kernel (one call
per layer with the boundaries), proven here through a stand-in that applies the kernel's own checks."""

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

import sft_lightning.linear_attention as linear_attention
from sft_lightning.attention import SDPA_VARLEN, packed_model_inputs
from sft_lightning.linear_attention import causal_conv_apart, packed_gated_delta_net, sample_positions
from sft_lightning.packing import collate_packed
from tests.conftest import ROOT
from tests.strict_kernels import strict_chunk_gated_delta_rule

TINY_QWEN35 = str(ROOT / "models" / "tiny-qwen3.5")
# Shorter and longer than the convolution's window of 4 tokens.
LENGTHS = [1, 2, 3, 7, 20]


def gated_delta_net():
    model = AutoModelForCausalLM.from_pretrained(TINY_QWEN35).eval()
    layer = next(m for m in model.modules() if type(m).__name__ == "Qwen3_5GatedDeltaNet")
    rule = __import__(type(layer).__module__, fromlist=["_"]).torch_chunk_gated_delta_rule
    return layer, rule


def test_the_packed_layer_computes_each_sample_as_the_layer_does_alone():
    layer, rule = gated_delta_net()
    torch.manual_seed(0)
    hidden = torch.randn(1, sum(LENGTHS), layer.hidden_size)
    bounds = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = packed_gated_delta_net(layer, rule, hidden, bounds)
        alone = torch.cat([layer(hidden[:, a:b]) for a, b in zip(bounds.tolist(), bounds[1:].tolist())], dim=1)
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        # Without the cut the first tokens of every later sample see the one before: the check can fail.
        whole = layer(hidden)
        assert (whole[:, LENGTHS[0] :] - alone[:, LENGTHS[0] :]).abs().max() > 1e-3


def test_the_convolution_window_stops_at_each_sample_start():
    x = torch.arange(1.0, 7.0).unsqueeze(-1)  # one channel: tokens 1..6, samples [1, 2] [3, 4, 5, 6]
    weight = torch.tensor([[1000.0, 100.0, 10.0, 1.0]])  # the newest token has the last weight
    positions = sample_positions(torch.tensor([0, 2, 6]), 6)
    assert positions.tolist() == [0, 1, 0, 1, 2, 3]
    assert causal_conv_apart(x, weight, None, positions)[:, 0].tolist() == [1, 12, 3, 34, 345, 3456]


def packed_logits(model, rows, autocast: bool):
    batch = collate_packed(rows, pad_token_id=0)
    inputs, _ = packed_model_inputs(batch, SDPA_VARLEN)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(**inputs, use_cache=False).logits.float()


def test_flash_linear_attention_is_called_once_per_layer_with_the_boundaries(monkeypatch):
    from sft_lightning.module import SFTLitModule

    module = SFTLitModule(TINY_QWEN35)
    module.configure_model()
    model = module.model.eval()
    model.config.use_cache = False
    torch.manual_seed(0)
    rows = [[(torch.randint(3, 700, (n,)).tolist(), [0] * n) for n in LENGTHS]]
    # Where the kernel does not run (no CUDA, not installed): the layer's own rule per sample.
    loop = packed_logits(model, rows, autocast=True)
    calls = Counter()
    monkeypatch.setattr(linear_attention, "delta_rule_kernel", lambda device: strict_chunk_gated_delta_rule(calls))
    kernel = packed_logits(model, rows, autocast=True)
    assert calls["chunk_gated_delta_rule"] == module._linear_layers == 1
    torch.testing.assert_close(kernel, loop, rtol=0.05, atol=0.05)  # bf16 activations, computed in two orders
    # float32 (no autocast) is declined: the kernel takes half precision only.
    packed_logits(model, rows, autocast=False)
    assert calls["chunk_gated_delta_rule"] == 1


def test_the_stand_in_refuses_what_the_kernel_refuses():
    rule = strict_chunk_gated_delta_rule()
    q = torch.randn(1, 6, 2, 4, dtype=torch.bfloat16)
    g, beta = torch.zeros(1, 6, 2), torch.rand(1, 6, 2, dtype=torch.bfloat16)
    bounds = torch.tensor([0, 2, 6])
    rule(q, q, q, g, beta, cu_seqlens=bounds)  # accepted
    with pytest.raises(AssertionError, match="does not support float32"):
        rule(q.float(), q.float(), q.float(), g, beta, cu_seqlens=bounds)
    with pytest.raises(ValueError, match="batch size is expected to be 1"):
        rule(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), g.expand(2, -1, -1),
             beta.expand(2, -1, -1), cu_seqlens=bounds)
    with pytest.raises(AssertionError, match="LongTensor"):
        rule(q, q, q, g, beta, cu_seqlens=bounds.int())
    with pytest.raises(AssertionError, match="shapes"):  # fewer key heads than value heads, not repeated
        rule(q[:, :, :1], q[:, :, :1], q, g, beta, cu_seqlens=bounds)
