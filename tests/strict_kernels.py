"""Test-only: torch's variable-length FlashAttention kernel on the CPU, refusing what the real one refuses.

The real ``varlen_attn`` is CUDA only, so a dtype, layout or signature mistake would first show on a GPU. This
stand-in binds each call against a signature (the installed torch's ``varlen_attn`` by default, or an older
release's), applies the input checks of ``mha_varlen_fwd`` (PyTorch's flash_api.cpp) and of the Python wrapper,
with their messages, then computes the attention with an explicit softmax in float32 and returns it in the input
dtype, as the kernel does. :class:`StrictVarlen` puts it in place for a whole ``sft-lightning`` run (every rank).
"""

from __future__ import annotations

import inspect
import json
from collections import Counter
from typing import Callable

import lightning as L
import torch

import sft_lightning.attention as attention
from sft_lightning.varlen import VarlenKernel
from tests.host_syncs import not_counted

try:
    from torch.nn.attention.varlen import varlen_attn as installed_varlen_attn
except ImportError:  # torch 2.9: no kernel to call (sdpa_varlen runs the per-sample loop); the newest signature

    def installed_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                              window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        ...


def check_flash_inputs(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k) -> None:
    """mha_varlen_fwd's checks (the messages are the kernel's)."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if key.dtype != query.dtype:
        raise RuntimeError("query and key must have the same dtype")
    if value.dtype != query.dtype:
        raise RuntimeError("query and value must have the same dtype")
    for bounds in (cu_seq_q, cu_seq_k):
        if bounds.dtype != torch.int32:
            raise RuntimeError("cu_seqlens_q must have dtype int32")
        if not bounds.is_contiguous():
            raise RuntimeError("cu_seqlens_q must be contiguous")
    if len({t.device for t in (query, key, value, cu_seq_q, cu_seq_k)}) != 1:
        raise RuntimeError("query, key, value and cu_seqlens must be on the same device")
    for tensor in (query, key, value):
        if tensor.dim() != 3:
            raise RuntimeError("Expected q, k, v of shape (total, heads, head_dim)")
        if tensor.stride(-1) != 1:
            raise RuntimeError("Input tensor must have contiguous last dimension")
    if query.shape[-1] > 256:
        raise RuntimeError("FlashAttention forward only supports head dimension at most 256")
    if query.shape[1] % key.shape[1] != 0 or key.shape[1] != value.shape[1]:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    if not (isinstance(max_q, int) and isinstance(max_k, int)):
        raise RuntimeError(f"max_q and max_k must be ints (SymInt), got {type(max_q).__name__}")


def reference_attention(query, key, value, bounds, scale, window: tuple[int, int]) -> torch.Tensor:
    """Softmax attention of each sample ``bounds`` delimits, in float32 (explicit, not a kernel)."""
    heads = query.shape[1]
    key, value = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (key, value))
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    output = torch.empty_like(query)
    ends = bounds.tolist()
    for start, end in zip(ends, ends[1:]):
        q, k, v = (t[start:end].float().transpose(0, 1) for t in (query, key, value))  # (heads, tokens, dim)
        scores = q @ k.transpose(1, 2) * scale
        position = torch.arange(end - start)
        offset = position[:, None] - position[None, :]  # query minus key position
        allowed = torch.ones_like(offset, dtype=torch.bool)
        if window[0] >= 0:
            allowed &= offset <= window[0]
        if window[1] >= 0:
            allowed &= offset >= -window[1]
        output[start:end] = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(0, 1).to(query.dtype)
    return output


def strict_varlen_attn(signature_of: Callable = installed_varlen_attn, calls: Counter | None = None) -> Callable:
    """A ``varlen_attn`` with the signature of ``signature_of``, its checks, and the semantics of its arguments."""
    signature = inspect.signature(signature_of)

    def varlen_attn(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)  # TypeError for an argument this release does not have
        bound.apply_defaults()
        given = bound.arguments
        query, key, value = given["query"], given["key"], given["value"]
        check_flash_inputs(query, key, value, given["cu_seq_q"], given["cu_seq_k"], given["max_q"], given["max_k"])
        if "enable_gqa" in given and not given["enable_gqa"] and query.shape[1] != key.shape[1]:
            raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={query.shape[1]} "
                             f"and Hkv={key.shape[1]}. Try setting enable_gqa=True for GQA.")
        window = tuple(given.get("window_size", (-1, 0) if given.get("is_causal") else (-1, -1)))
        if calls is not None:
            calls[str(query.dtype)] += 1
        with not_counted():  # what it reads of its inputs, the kernel reads on the GPU
            return reference_attention(query, key, value, given["cu_seq_q"], given.get("scale"), window)

    varlen_attn.__signature__ = signature
    return varlen_attn


class StrictVarlen(L.Callback):
    """For a whole run: ``sdpa_varlen`` calls the strict stand-in on any device, as it calls the kernel on a GPU.
    Each rank writes the dtypes of its calls to ``{path}.{rank}`` (JSON) when the run ends; nothing stays patched."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: Counter = Counter()

    def setup(self, trainer, pl_module, stage) -> None:  # before configure_model
        self.original = attention.varlen_kernel
        kernel = VarlenKernel.of(strict_varlen_attn(calls=self.calls))
        attention.varlen_kernel = lambda device: kernel

    def teardown(self, trainer, pl_module, stage) -> None:
        attention.varlen_kernel = self.original
        with open(f"{self.path}.{trainer.global_rank}", "w") as file:
            json.dump(dict(self.calls), file)


def strict_calls(path, ranks: int = 1) -> list[dict[str, int]]:
    """What :class:`StrictVarlen` recorded on each rank."""
    return [json.loads(open(f"{path}.{rank}").read()) for rank in range(ranks)]


def strict_chunk_gated_delta_rule(calls: Counter | None = None) -> Callable:
    """flash-linear-attention's ``chunk_gated_delta_rule`` (fla/ops/gated_delta_rule/chunk.py) on the CPU: its
    signature, its checks with their messages, then the delta rule of each sample ``cu_seqlens`` delimits through
    transformers' own torch rule in float32, returned in the input dtype as the kernel does."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, head_first=False):
        assert q.dtype == k.dtype == v.dtype
        assert q.dtype != torch.float32, "ChunkGatedDeltaRuleFunction does not support float32. Please use bfloat16."
        assert len(beta.shape) == 3, "beta must be of shape [B, T, H] if head_first=False, or [B, H, T] otherwise."
        # One head count for q, k and v ([B, T, H, K] and [B, T, H, V]); g and beta [B, T, H].
        assert q.shape[:3] == k.shape[:3] == v.shape[:3] and g.shape == beta.shape == q.shape[:3], "shapes"
        if cu_seqlens is not None:
            if q.shape[0] != 1:
                raise ValueError(f"The batch size is expected to be 1 rather than {q.shape[0]} when using `cu_seqlens`.")
            assert cu_seqlens.dtype == torch.long and cu_seqlens.device == q.device, "cu_seqlens: a LongTensor"
        if calls is not None:
            calls["chunk_gated_delta_rule"] += 1
        ends = cu_seqlens.tolist() if cu_seqlens is not None else [0, q.shape[1]]
        upcast = [t.float() for t in (q, k, v)]
        out = torch.cat([
            torch_chunk_gated_delta_rule(*(t[:, a:b] for t in upcast), g=g[:, a:b].float(), beta=beta[:, a:b].float(),
                                         use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)[0]
            for a, b in zip(ends, ends[1:])
        ], dim=1)
        return out.to(q.dtype), None

    return chunk_gated_delta_rule
