"""Packed samples kept apart in linear-attention layers (Gated DeltaNet: Qwen3.5, Qwen3-Next).

A linear-attention layer carries a recurrent state along the sequence, and its short causal convolution mixes each
token with the few before it: in a packed row both cross from one sample into the next unless every kernel is told
where samples end. transformers 5.24's torch kernels are not (its chunked delta rule refuses packed rows; its
convolution ignores the boundaries), nor is the optional ``causal-conv1d`` kernel it may call. So a packed forward of
a Qwen3.5 Gated DeltaNet runs here (:func:`packed_gated_delta_net`): the projections once over the row, the
convolution with its window cut at every sample start, and the delta rule with the boundaries:
``flash-linear-attention``'s chunked kernel takes them (``cu_seqlens``) on a GPU where it is installed; elsewhere the
layer's own torch rule runs once per sample. A layer of another shape (Qwen3-Next's fused projections) runs whole,
once per sample. Everything else (generation, padded batches) calls the layer as it is.
"""

from __future__ import annotations

import sys
from functools import lru_cache, partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers.activations import ACT2FN

from sft_lightning.varlen import HALF_DTYPES

# Class names of the layers that carry state along the sequence (transformers' Gated DeltaNet of Qwen3.5,
# Qwen3.5-MoE and Qwen3-Next).
LINEAR_ATTENTION_CLASSES = ("GatedDeltaNet",)
# The keyword arguments of a packed forward (attention.packed_model_inputs), which one sample's call must not see.
PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# What packed_gated_delta_net reads of a layer: transformers 5.24's Qwen3_5GatedDeltaNet (and Qwen3.5-MoE's copy).
GATED_DELTA_NET_PARTS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "A_log", "dt_bias", "norm",
                         "out_proj", "key_dim", "value_dim", "head_k_dim", "head_v_dim", "activation")


def keep_linear_attention_apart(model: nn.Module) -> int:
    """Make each linear-attention layer of ``model`` keep the samples of a packed row apart; returns how many."""
    layers = [module for module in model.modules() if type(module).__name__.endswith(LINEAR_ATTENTION_CLASSES)]
    for layer in layers:
        rule = getattr(sys.modules[type(layer).__module__], "torch_chunk_gated_delta_rule", None)
        packed = None
        if rule is not None and all(hasattr(layer, part) for part in GATED_DELTA_NET_PARTS):
            packed = partial(packed_gated_delta_net, layer, rule)
        layer.forward = partial(per_sample_forward, layer.forward, packed)
    return len(layers)


def delta_rule_kernel(device: torch.device) -> Optional[Callable]:
    """flash-linear-attention's chunked gated delta rule where it runs (CUDA, installed), else None."""
    return _fla_chunk_gated_delta_rule() if device.type == "cuda" else None


@lru_cache(maxsize=None)
def _fla_chunk_gated_delta_rule() -> Optional[Callable]:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        rank_zero_info("packing: flash-linear-attention is not installed: the Gated DeltaNet layers run the delta rule "
                       "once per packed sample (pip install flash-linear-attention for one call per layer)")
        return None
    return chunk_gated_delta_rule


def sample_positions(bounds: torch.Tensor, total: int) -> torch.Tensor:
    """Each token's position within its sample, for samples ``bounds`` delimits (without a host sync)."""
    starts, lengths = bounds[:-1], bounds.diff()
    return torch.arange(total, device=bounds.device) - torch.repeat_interleave(starts, lengths, output_size=total)


def causal_conv_apart(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      positions: torch.Tensor) -> torch.Tensor:
    """The depthwise causal convolution of ``x`` (tokens, channels) with ``weight`` (channels, width), each token
    seeing only the tokens of its own sample (``positions``: index within the sample): a window cut at every start."""
    width = weight.shape[-1]
    out = x * weight[:, width - 1]
    for shift in range(1, width):
        earlier = F.pad(x[:-shift], (0, 0, shift, 0))  # the token `shift` places before, zeros before the row
        out = out + earlier * weight[:, width - 1 - shift] * (positions >= shift).unsqueeze(-1)
    return out if bias is None else out + bias


def packed_gated_delta_net(layer: nn.Module, rule: Callable, hidden_states: torch.Tensor,
                           bounds: torch.Tensor) -> torch.Tensor:
    """A Qwen3.5 Gated DeltaNet's forward (no cache) over rows laid end to end, samples ``bounds`` delimits kept
    apart: the layer's own computation, with the convolution and the delta rule restarted at every sample start."""
    batch, length, width = hidden_states.shape
    total = batch * length
    x = hidden_states.reshape(1, total, width)
    mixed = layer.in_proj_qkv(x)[0]
    conv = causal_conv_apart(mixed, layer.conv1d.weight[:, 0], layer.conv1d.bias, sample_positions(bounds, total))
    mixed = ACT2FN[layer.activation](conv).to(mixed.dtype)[None]
    query, key, value = torch.split(mixed, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    query = query.reshape(1, total, -1, layer.head_k_dim)
    key = key.reshape(1, total, -1, layer.head_k_dim)
    value = value.reshape(1, total, -1, layer.head_v_dim)
    beta = layer.in_proj_b(x).sigmoid()
    decay = -layer.A_log.float().exp() * F.softplus(layer.in_proj_a(x).float() + layer.dt_bias)
    kernel = delta_rule_kernel(x.device)
    if kernel is not None and query.dtype in HALF_DTYPES:
        # One call for the row. Each query/key head serves num_v_heads / num_k_heads value heads: repeated here, as
        # the kernel takes one head count for q, k and v.
        groups = value.shape[2] // query.shape[2]
        query, key = query.repeat_interleave(groups, dim=2), key.repeat_interleave(groups, dim=2)
        out, _ = kernel(query, key, value, g=decay, beta=beta, use_qk_l2norm_in_kernel=True, cu_seqlens=bounds.long())
    else:
        ends = bounds.tolist()
        out = torch.cat([
            rule(query[:, a:b], key[:, a:b], value[:, a:b], g=decay[:, a:b], beta=beta[:, a:b],
                 use_qk_l2norm_in_kernel=True)[0]
            for a, b in zip(ends, ends[1:])
        ], dim=1)
    gate = layer.in_proj_z(x).reshape(-1, layer.head_v_dim)
    out = layer.norm(out.reshape(-1, layer.head_v_dim), gate).reshape(1, total, -1)
    return layer.out_proj(out).reshape(batch, length, -1)


def per_sample_forward(forward, packed: Optional[Callable], *args, **kwargs) -> torch.Tensor:
    """``forward(hidden_states, ...)`` of a packed batch (rows end to end, ``cu_seq_lens_q`` the boundaries) with no
    state or convolution window reaching across a boundary: ``packed(hidden_states, bounds)`` where the layer has
    one, else one call per sample."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return forward(*args, **kwargs)
    if "hidden_states" in kwargs:
        hidden_states = kwargs.pop("hidden_states")
    else:
        hidden_states, *args = args
    if packed is not None:
        return packed(hidden_states, bounds)
    # A sample's own call has no padding (padding is a pseudo-sample of its own) and no boundaries.
    rest = {name: value for name, value in kwargs.items() if name not in PACKED_KWARGS and name != "attention_mask"}
    batch, length, width = hidden_states.shape
    flat = hidden_states.reshape(1, batch * length, width)
    ends = bounds.tolist()
    outputs = [forward(flat[:, start:end], *args, **rest) for start, end in zip(ends, ends[1:])]
    return torch.cat(outputs, dim=1).reshape(batch, length, -1)
