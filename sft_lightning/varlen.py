"""torch's variable-length FlashAttention kernel, called as the installed torch spells it, with inputs it accepts.

``torch.nn.attention.varlen.varlen_attn`` runs every packed sample of a batch in one call. Its signature moved
between releases, and the kernel behind it (``mha_varlen_fwd``) refuses what it cannot run, at run time, on the GPU:

| torch | signature |
| --- | --- |
| <= 2.9 | no ``torch.nn.attention.varlen`` |
| 2.10 | ``(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None)``: no scale, no window, no GQA |
| 2.11 | ``(..., *, return_aux, scale, window_size)``; causal is ``window_size=(-1, 0)`` |
| 2.12, 2.13 | as 2.11, plus ``enable_gqa`` |

and the kernel takes fp16/bf16 only, q/k/v of one dtype, int32 boundaries and a contiguous last dimension, on an
Ampere or newer GPU. :func:`varlen_kernel` reads the signature once; :func:`run_varlen` brings q/k/v to the dtype
the layer computes in (under autocast the embeddings and RoPE leave q/k in float32 while v is bf16, as
transformers' own FlashAttention path knows) and makes up for what the installed signature lacks: the query
pre-scaled where there is no ``scale``, grouped-query attention asked for only where ``enable_gqa`` exists (the
kernel always took fewer key/value heads; 2.12 made the caller say so). What it cannot make up for (a sliding window
on 2.10, float32 without autocast) it declines, and the caller runs the samples one by one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

HALF_DTYPES = (torch.float16, torch.bfloat16)
# FlashAttention 2 (what varlen_attn calls) runs on compute capability 8.0 (A100) and newer.
FLASH_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class VarlenKernel:
    """``varlen_attn`` and which of its keyword arguments the installed torch has."""

    call: Callable
    takes_scale: bool
    takes_window: bool
    takes_gqa: bool
    takes_is_causal: bool  # torch 2.10: causal as a flag, not as a window

    @classmethod
    def of(cls, function: Callable) -> "VarlenKernel":
        parameters = inspect.signature(function).parameters
        return cls(function, "scale" in parameters, "window_size" in parameters, "enable_gqa" in parameters,
                   "is_causal" in parameters)


def varlen_kernel(device: torch.device) -> Optional[VarlenKernel]:
    """The kernel where it runs (CUDA, Ampere or newer, a torch that has it), else None: samples run one by one."""
    if device.type != "cuda":
        return None
    return _cuda_varlen_kernel(torch.cuda.get_device_capability(device))


@lru_cache(maxsize=None)
def _cuda_varlen_kernel(capability: tuple[int, int]) -> Optional[VarlenKernel]:
    if capability < FLASH_MIN_CAPABILITY:
        rank_zero_info(f"sdpa_varlen: this GPU (sm{capability[0]}{capability[1]}) predates FlashAttention (sm80): packed "
                       "samples run one at a time through SDPA; data.packing false with attn_implementation sdpa may "
                       "be faster")
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        rank_zero_info(f"sdpa_varlen: torch {torch.__version__} has no variable-length attention kernel (torch 2.10 "
                       "and newer do); packed samples run one at a time through SDPA")
        return None
    return VarlenKernel.of(varlen_attn)


def compute_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Optional[torch.dtype]:
    """The half dtype the layer computes in: autocast's, else the one half dtype among q/k/v; None for float32."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype if dtype in HALF_DTYPES else None
    return next((t.dtype for t in (value, query, key) if t.dtype in HALF_DTYPES), None)


def run_varlen(
    kernel: VarlenKernel, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: torch.Tensor,
    longest: int, scale: Optional[float], window: Optional[int],
) -> Optional[torch.Tensor]:
    """Causal attention of the samples ``bounds`` delimits in (tokens, heads, dim) q/k/v, or None where this kernel
    cannot serve (the caller falls back). The output is in the compute dtype, as transformers' FlashAttention's."""
    dtype = compute_dtype(query, key, value)
    if dtype is None or (window is not None and not kernel.takes_window):
        return None
    query, key, value = (t.to(dtype).contiguous() for t in (query, key, value))
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[2]
    options = {}
    if kernel.takes_window:
        options["window_size"] = (-1 if window is None else window - 1, 0)
    elif kernel.takes_is_causal:
        options["is_causal"] = True
    if kernel.takes_scale:
        options["scale"] = scale
    elif scale is not None and scale != dim**-0.5:
        query = query * (scale * dim**0.5)  # the kernel divides by sqrt(dim)
    if kv_heads != heads and kernel.takes_gqa:
        options["enable_gqa"] = True  # asked for from 2.12 on; before, the kernel took fewer key/value heads as is
    return kernel.call(query, key, value, bounds, bounds, longest, longest, **options)
