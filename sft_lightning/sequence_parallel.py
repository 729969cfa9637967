"""Sequence parallelism (Ulysses): the ranks of a sequence group share one packed micro-batch along its length.

Each rank of a group of ``N`` runs the embeddings, the MLPs, the norms, the LM head and the loss on its own ``1/N`` of
the tokens (:func:`sft_lightning.packing.slice_packed`, on the host before the batch goes to the device), so a sample's activations are
spread over the group. Attention needs every token of a sample: around it, one all-to-all gives each rank the whole
sequence for ``1/N`` of the heads, the variable-length attention runs with the batch's global sample boundaries, and
a second all-to-all gives each rank its own tokens back with every head (:func:`ulysses`). Both exchanges carry their
gradients back the same way, so the backward is exact.

The loss of a slice is the NLL sum of the supervised tokens it predicts: the slices of a row predict each supervised
token exactly once (the last position of a slice is scored against the first label of the next, which every rank has),
and the gradients are reduced over every rank of the run (FSDP2 shards over all of them), so the divisor is the number
of processes (:func:`sft_lightning.layout.framework_divisor`).

Pure apart from the all-to-all: no Lightning and no model.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from sft_lightning.errors import ConfigError

# The keyword that carries the sequence group from the model's inputs down to the attention function (transformers
# passes a forward's extra keywords through every decoder layer to it).
SEQUENCE_GROUP = "sequence_group"


def exchange(tensor: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """All-to-all over ``group``: ``tensor`` cut into one part per rank along ``scatter_dim``, part ``i`` sent to rank
    ``i``, and the parts received laid side by side along ``gather_dim`` in rank order."""
    size = dist.get_world_size(group)
    send = torch.stack(tensor.chunk(size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _Exchange(torch.autograd.Function):
    """:func:`exchange` whose backward is the reverse exchange of the gradient."""

    @staticmethod
    def forward(ctx, tensor, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return exchange(tensor, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return exchange(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def ulysses(attention: Callable) -> Callable:
    """``attention`` (a transformers attention function) that, given a :data:`SEQUENCE_GROUP`, runs on the whole
    sequence for its share of the heads: q/k/v ``(batch, heads, slice, dim)`` become ``(batch, heads/N, N*slice, dim)``
    by one all-to-all, and the output ``(batch, N*slice, heads/N, dim)`` goes back to ``(batch, slice, heads, dim)`` by
    another. Without a group, ``attention`` itself."""

    def sequence_parallel_attention(module, query, key, value, attention_mask, **kwargs):
        group = kwargs.pop(SEQUENCE_GROUP, None)
        if group is None:
            return attention(module, query, key, value, attention_mask, **kwargs)
        whole = [_Exchange.apply(t, group, 1, 2) for t in (query, key, value)]
        output, _ = attention(module, *whole, attention_mask, **kwargs)
        return _Exchange.apply(output, group, 1, 2), None

    return sequence_parallel_attention


def check_sequence_parallel(config, size: int, attn_implementation: Optional[str]) -> None:
    """Refuse, in one line, a model that sequence parallelism over ``size`` ranks cannot split."""
    from sft_lightning.attention import SDPA_VARLEN  # attention.py registers its function through this module

    if attn_implementation != SDPA_VARLEN:
        raise ConfigError(
            f"sequence_parallel_size {size} runs attention through sdpa_varlen (torch's variable-length FlashAttention "
            f"kernel on a GPU): set model.attn_implementation sdpa_varlen, not {attn_implementation}"
        )
    text = getattr(config, "text_config", None) or config
    if "linear_attention" in (getattr(text, "layer_types", None) or []):
        raise ConfigError(f"sequence_parallel_size {size}: {text.model_type}'s linear-attention layers run a recurrence "
                          "along the sequence that cannot be split across ranks yet: set it to 1")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % size or kv_heads % size:
        raise ConfigError(
            f"sequence_parallel_size {size} must divide the model's {heads} attention heads and {kv_heads} key/value "
            f"heads (each rank attends with 1/{size} of them): choose one of {divisors(heads, kv_heads)}"
        )


def divisors(*counts: int) -> list[int]:
    """The sizes that divide every one of ``counts``."""
    return [n for n in range(1, min(counts) + 1) if all(c % n == 0 for c in counts)]
