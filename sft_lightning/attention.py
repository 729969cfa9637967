"""``sdpa_varlen``: PyTorch SDPA that runs each packed sample on its own, for machines without FlashAttention.

transformers' own answer to packed rows under ``sdpa`` is a dense block-diagonal mask: every row pays for
``max_length ** 2`` attention scores, most of them masked, and the mask itself is built every layer. Running
the causal kernel once per sample costs ``sum(length ** 2)`` instead (measured 20% faster per step for 1024-token
rows of ~200-token chats on a CPU). Anything that is not a packed training batch (padded evaluation, generation
with a cache) goes to transformers' ``sdpa`` untouched, so this name is a drop-in for ``sdpa``.

A packed batch reaches this function when :func:`packed_model_inputs` passes ``cu_seq_lens_q`` (the sample
boundaries over the rows laid end to end) with an all-ones ``attention_mask``; the all-ones mask is what stops
transformers from building the dense block mask, so it is only ever passed together with this attention. Every
mask :func:`model_inputs` passes says whether it has padding (:data:`MASK_HAS_PADDING`, known to the collate), so
that this attention's mask function decides without reading the mask back from the GPU, as transformers'
``sdpa_mask`` would in every forward.

On a GPU the whole packed batch is one call per layer of torch's variable-length FlashAttention kernel
(:mod:`sft_lightning.varlen`: the installed torch's signature, q/k/v in the compute dtype), with the boundaries and
the longest sample computed once per batch by the collate; the per-sample loop is the CPU's way, and the fallback
where no kernel can serve (float32, a GPU before Ampere, a torch without the kernel).
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from sft_lightning.collate import PackedBatch, PackedSlice, SupervisedPositions, TrainingBatch
from sft_lightning.errors import PackingError
from sft_lightning.packing import collate_packed
from sft_lightning.sequence_parallel import SEQUENCE_GROUP, ulysses
from sft_lightning.varlen import run_varlen, varlen_kernel

SDPA_VARLEN = "sdpa_varlen"
# The packing check packs two spans of this many tokens from the first batch.
PACKING_CHECK_TOKENS = 128
# Same shapes round the same way, so a correct attention moves the second span's logits by exactly 0; a leak moves
# them by a sizeable fraction of their scale.
PACKING_CHECK_TOLERANCE = 1e-3
# Attribute of an attention mask built by model_inputs: whether any position is padding, known on the host.
MASK_HAS_PADDING = "_sft_lightning_has_padding"


def sdpa_varlen_forward(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    bounds = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    longest = kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None:
        raise ValueError("sdpa_varlen got both sample boundaries and an attention mask")
    window = kwargs.pop("sliding_window", None)
    kwargs.pop("is_causal", None)
    batch, heads, length, dim = query.shape
    kernel = varlen_kernel(query.device)
    if kernel is not None and longest is not None and not (module.training and kwargs.get("dropout", 0.0)):
        # One call for every sample of the batch: (batch, heads, length, dim) -> (tokens, heads, dim).
        flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
        output = run_varlen(kernel, *flat, bounds, longest, kwargs.get("scaling"), window)
        if output is not None:
            return output.reshape(batch, length, heads, dim), None
    # (batch, heads, length, dim) -> (1, heads, batch * length, dim): the rows end to end, as ``bounds`` counts them
    # (packed_model_inputs already passes one row; any other caller may pass several).
    ends = bounds.tolist()
    flat = [t.transpose(0, 1).reshape(1, t.shape[1], batch * length, dim) for t in (query, key, value)]
    outputs = []
    for start, end in zip(ends[:-1], ends[1:]):
        q, k, v = (t[:, :, start:end] for t in flat)
        if window is not None and end - start > window:  # a sliding-window layer: causal, and no further back
            mask = sliding_window_mask(end - start, window, query.device)
            outputs.append(sdpa_attention_forward(module, q, k, v, mask, is_causal=False, **kwargs)[0])
        else:
            outputs.append(sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0])
    # Each output is (1, tokens, heads, dim); back to (batch, length, heads, dim).
    return torch.cat(outputs, dim=1).reshape(batch, length, heads, dim), None


def sliding_window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """(1, 1, length, length) bool: a query sees itself and the ``window - 1`` tokens before it (transformers' and
    FlashAttention's sliding window)."""
    position = torch.arange(length, device=device)
    behind = position[:, None] - position[None, :]
    return ((behind >= 0) & (behind < window))[None, None]


def model_inputs(batch: TrainingBatch, attn_implementation: str, sequence_group=None) -> tuple[dict, SupervisedPositions]:
    """The model's inputs for a training batch, and the positions the loss scores in the layout they have;
    ``sequence_group``: the process group a :class:`PackedSlice`'s attention exchanges heads with."""
    if isinstance(batch, PackedSlice):
        return sliced_model_inputs(batch, sequence_group), batch.supervision
    if isinstance(batch, PackedBatch):
        return packed_model_inputs(batch, attn_implementation)
    has_padding = batch.counts.tokens < batch.counts.slots
    return {"input_ids": batch.input_ids, "attention_mask": marked_mask(batch.attention_mask, has_padding)}, batch.supervision


def marked_mask(mask: torch.Tensor, has_padding: bool) -> torch.Tensor:
    """``mask`` as bool (on its device already, so transformers passes this very tensor to the mask function),
    marked with whether it has padding."""
    mask = mask.bool()
    setattr(mask, MASK_HAS_PADDING, has_padding)
    return mask


def packed_model_inputs(batch: PackedBatch, attn_implementation: str) -> tuple[dict, SupervisedPositions]:
    """Model inputs of a packed batch for the attention in use, so that no sample attends to another, and the
    positions the loss scores.

    The variable-length attentions take the rows laid end to end as one (each row's padding is a pseudo-sample
    of its own, and every first label is masked, so the shift inside the loss never crosses a boundary either):
    FlashAttention finds the samples from ``position_ids`` only in a single row, and one row lets
    ``logits_to_keep`` pick exactly the supervised positions. Both get the boundaries and the longest sample
    from the collate (``cu_seq_lens_q/k``, ``max_length_q/k``). ``sdpa``
    and ``eager`` keep the rows and get no mask, from which transformers builds the block-diagonal one out of
    ``position_ids``.
    """
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    if "flash" not in attn_implementation and attn_implementation != SDPA_VARLEN:
        return inputs, batch.supervision_rows
    inputs = {name: tensor.reshape(1, -1) for name, tensor in inputs.items()}
    if attn_implementation == SDPA_VARLEN:
        inputs["attention_mask"] = marked_mask(torch.ones_like(inputs["input_ids"], dtype=torch.bool), has_padding=False)
    # The boundaries and the longest sample, computed once by the collate: FlashAttention-2 in transformers then
    # skips re-deriving them from position_ids (host syncs) in every layer; sdpa_varlen's kernel needs them.
    bounds, longest = batch.cu_seq_lens, batch.max_seq_len
    inputs.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
    return inputs, batch.supervision_flat


def sliced_model_inputs(batch: PackedSlice, sequence_group) -> dict:
    """A sequence-parallel slice's inputs for ``sdpa_varlen`` (the one attention :mod:`sequence_parallel` wraps): its
    tokens and positions, the whole micro-batch's boundaries, and the group its attention exchanges with."""
    if sequence_group is None:
        raise ValueError("a sequence-parallel slice needs the sequence group its attention exchanges heads with")
    bounds, longest = batch.cu_seq_lens, batch.max_seq_len
    return {
        "input_ids": batch.input_ids, "position_ids": batch.position_ids,
        "attention_mask": marked_mask(torch.ones_like(batch.input_ids, dtype=torch.bool), has_padding=False),
        "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest,
        SEQUENCE_GROUP: sequence_group,
    }


def cross_sample_influence(model, first: torch.Tensor, second: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """How far the logits of ``second`` move when the sample packed before it in the same row, ``first``, is
    replaced by other tokens of the same length; relative to the logits' scale, as a float32 scalar.

    Exactly 0 when the attention keeps packed samples apart, in any precision and on any strategy: both forwards
    have the same shapes, so the same kernels round the same way, and nothing of ``first`` reaches ``second``.
    """
    other = (first + 1) % model.get_input_embeddings().num_embeddings
    logits = []
    for before in (first, other):
        row = [(before.tolist(), before.tolist()), (second.tolist(), second.tolist())]
        batch = collate_packed([row], pad_token_id=0).to(first.device)
        inputs, _ = packed_model_inputs(batch, attn_implementation)
        output = model(**inputs, use_cache=False).logits
        logits.append(output.reshape(-1, output.shape[-1])[len(first) :].float())
    return (logits[0] - logits[1]).abs().max() / logits[0].abs().max().clamp(min=1e-6)


def check_packing(model, input_ids: torch.Tensor, gather_max: Callable[[torch.Tensor], torch.Tensor],
                  keeps_linear_layers_apart: bool) -> None:
    """Refuse (:class:`PackingError`) an attention that lets packed samples mix: :func:`cross_sample_influence` on two
    spans of ``input_ids`` (the first packed batch), through the model as it runs (sharded, mixed precision);
    ``gather_max``: the largest influence over the ranks, so that every rank decides the same."""
    tokens = input_ids.reshape(-1)[: 2 * PACKING_CHECK_TOKENS]
    half = len(tokens) // 2
    attn = model.config._attn_implementation
    was_training = model.training
    model.eval()  # no dropout, so any difference is the attention's
    with torch.no_grad():
        influence = cross_sample_influence(model, tokens[:half], tokens[half : 2 * half], attn)
    model.train(was_training)
    influence = gather_max(influence).item()
    if influence > PACKING_CHECK_TOLERANCE:
        # Linear-attention layers learn the sample boundaries only from the variable-length inputs.
        fits = "sdpa_varlen or flash_attention_2" if keeps_linear_layers_apart else "sdpa_varlen, sdpa or flash_attention_2"
        raise PackingError(
            f"packed samples attend to each other with attn_implementation={attn} (a sample's logits move by "
            f"{influence:.3g} of their scale when the sample before it changes): use {fits}, or set data.packing false"
        )


def sdpa_varlen_mask(*args, attention_mask=None, **kwargs):
    """transformers' ``sdpa_mask``, told by a mask from :func:`model_inputs` whether it has padding instead of
    reading it back from the device: without padding no mask at all (a packed batch's boundaries keep its samples
    apart, and a sliding window is the kernel's), with padding the mask is built without the check."""
    has_padding = getattr(attention_mask, MASK_HAS_PADDING, None)
    if has_padding is False:
        return None
    if has_padding:
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


# Sequence-parallel when the inputs carry a sequence group (sliced_model_inputs), plain sdpa_varlen otherwise.
AttentionInterface.register(SDPA_VARLEN, ulysses(sdpa_varlen_forward))
ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_VARLEN, sdpa_varlen_mask)
