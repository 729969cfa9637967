"""Packed samples kept apart in linear-attention layers (Gated DeltaNet: Qwen3.5, Qwen3-Next).

A linear-attention layer carries a recurrent state along the sequence, and its short causal convolution mixes each
token with the few before it: in a packed row both cross from one sample into the next unless every kernel is told
where samples end. transformers 5.24's torch kernels are not (its chunked delta rule refuses packed rows; its
convolution ignores the boundaries), and the optional ``flash-linear-attention``/``causal-conv1d`` kernels are not
handed the convolution's boundaries either. So a packed forward runs each such layer once per sample (the boundaries
the collate computed), on every device: exact, as the packing check measures for the whole model, at the cost of one
call per sample in these layers. Everything else (generation, padded batches) calls the layer as it is.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

# Class names of the layers that carry state along the sequence (transformers' Gated DeltaNet of Qwen3.5,
# Qwen3.5-MoE and Qwen3-Next).
LINEAR_ATTENTION_CLASSES = ("GatedDeltaNet",)
# The keyword arguments of a packed forward (attention.packed_model_inputs), which one sample's call must not see.
PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def keep_linear_attention_apart(model: nn.Module) -> int:
    """Make each linear-attention layer of ``model`` run packed rows one sample at a time; returns how many."""
    layers = [module for module in model.modules() if type(module).__name__.endswith(LINEAR_ATTENTION_CLASSES)]
    for layer in layers:
        layer.forward = partial(per_sample_forward, layer.forward)
    return len(layers)


def per_sample_forward(forward, *args, **kwargs) -> torch.Tensor:
    """``forward(hidden_states, ...)`` of a packed batch (rows end to end, ``cu_seq_lens_q`` the boundaries) as one
    call per sample, with no state or convolution window reaching across a boundary."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return forward(*args, **kwargs)
    if "hidden_states" in kwargs:
        hidden_states = kwargs.pop("hidden_states")
    else:
        hidden_states, *args = args
    # A sample's own call has no padding (padding is a pseudo-sample of its own) and no boundaries.
    rest = {name: value for name, value in kwargs.items() if name not in PACKED_KWARGS and name != "attention_mask"}
    batch, length, width = hidden_states.shape
    flat = hidden_states.reshape(1, batch * length, width)
    ends = bounds.tolist()
    outputs = [forward(flat[:, start:end], *args, **rest) for start, end in zip(ends, ends[1:])]
    return torch.cat(outputs, dim=1).reshape(batch, length, -1)
