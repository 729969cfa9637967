"""The LM head and the loss in chunks: the [positions x vocabulary] logits never exist whole.

At a real vocabulary (Qwen2.5: 151,936 tokens) the float32 logits of a micro-batch's supervised positions, kept
for backward with their gradient, outweigh the model itself. :class:`ChunkedLMHead` is the model's own output
layer (same parameters, same state-dict keys, tied or not) that, while :meth:`ChunkedLMHead.scoring` is active,
returns the NLL sum and the count of correct argmax predictions of its targets instead of logits. The forward
runs ``chunk_tokens`` positions at a time under no_grad; the backward recomputes each chunk's logits and turns
them into gradients right away (``softmax - onehot``), so the peak is one chunk's logits, in training,
validation and test alike. Numerics follow the unchunked path: logits from the layer's own matmul (under autocast
in bf16), upcast to float32 for the softmax.

Chunks cost a recompute of the head in the backward (about 12% of a step at a small vocabulary), which buys nothing
where the logits are small: a micro-batch whose logits (with their float32 copy and gradient, :func:`logits_bytes`)
take no more than ``chunk_above_bytes`` is scored whole, by autograd, with the same results.

Outside :meth:`~ChunkedLMHead.scoring` (generation, chat, export, the packing check) it is the plain linear layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sft_lightning.collate import SupervisedPositions
from sft_lightning.loss import gather_supervised, token_stats

# Config attributes by which a model transforms its logits after the head (Gemma 2/3 soft-capping, Cohere and
# Granite scaling): the loss must see the transformed logits, so such models keep the unchunked path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# The defaults of model.lm_head_chunk_tokens and model.lm_head_chunk_above_mb (the memory plan reads them too).
CHUNK_TOKENS, CHUNK_ABOVE_MB = 512, 256.0


def logits_bytes(positions: float, vocabulary: int, element_bytes: float) -> float:
    """Bytes of the logits of ``positions`` over ``vocabulary`` kept for the backward: in the head's compute dtype
    (``element_bytes``), their float32 copy, and its gradient."""
    return positions * vocabulary * (element_bytes + 4 + 4)


def in_chunks(positions: float, vocabulary: int, element_bytes: float, chunk_above_bytes: float) -> bool:
    """Whether a micro-batch of ``positions`` is scored in chunks: where its logits would take more than
    ``chunk_above_bytes`` (the rule the head applies and the memory plan counts)."""
    return logits_bytes(positions, vocabulary, element_bytes) > chunk_above_bytes


class ChunkedCrossEntropy(torch.autograd.Function):
    """(NLL sum, correct count) of ``hidden @ weight.T + bias`` against ``targets``, ``chunk`` rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        compute_dtype = weight.dtype
        with torch.no_grad():
            for start in range(0, len(targets), chunk):
                logits = F.linear(hidden[start : start + chunk], weight, bias)  # under autocast: in its dtype
                compute_dtype = logits.dtype
                logits = logits.float()
                target = targets[start : start + chunk]
                nll += F.cross_entropy(logits, target, reduction="sum")
                correct += (logits.argmax(dim=-1) == target).sum()
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.compute_dtype = chunk, compute_dtype
        ctx.mark_non_differentiable(correct)
        return nll, correct

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_nll, grad_correct):
        hidden, weight, bias, targets = ctx.saved_tensors
        # What autocast did in the forward, explicitly: the layer's matmul in compute_dtype.
        dtype = ctx.compute_dtype
        weight_c = weight.to(dtype)
        bias_c = bias.to(dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, len(targets), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            hidden_c = hidden[rows].to(dtype)
            probabilities = F.linear(hidden_c, weight_c, bias_c).float().softmax(dim=-1)
            # d(NLL sum)/d(logits) = softmax - onehot, scaled by the incoming gradient, then back through the float32
            # upcast (to compute_dtype) and the layer, as autograd does on the unchunked path.
            probabilities[torch.arange(len(probabilities), device=probabilities.device), targets[rows]] -= 1
            grad_logits = (probabilities * grad_nll).to(dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight_c).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ hidden_c).float()
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(dim=0)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None


class ChunkedLMHead(nn.Linear):
    """The model's output layer, which scores targets in chunks while :meth:`scoring` is active."""

    chunk_tokens: int = 512
    chunk_above_bytes: float = 0.0  # logits of at most this many bytes are scored whole
    _positions: Optional[SupervisedPositions] = None
    _every_position = False

    @contextmanager
    def scoring(self, positions: SupervisedPositions, every_position: bool = False):
        """Within: a forward returns ``[nll_sum, correct]`` (float32) of the supervised positions, from the hidden
        states of the kept positions ``(rows, len(positions.keep), hidden)`` (``every_position``: of every position,
        for a model whose forward keeps no subset)."""
        self._positions, self._every_position = positions, every_position
        try:
            yield
        finally:
            self._positions = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._positions is None:
            return super().forward(hidden)
        if self._every_position:
            hidden = hidden[:, self._positions.keep]
        hidden, targets = gather_supervised(hidden, self._positions), self._positions.targets
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        if in_chunks(len(targets), self.out_features, compute.itemsize, self.chunk_above_bytes):
            nll, correct = ChunkedCrossEntropy.apply(hidden, self.weight, self.bias, targets, self.chunk_tokens)
        else:  # the unchunked path's own statistics
            stats = token_stats(F.linear(hidden, self.weight, self.bias), targets)
            nll, correct = stats.nll_sum, stats.correct
        return torch.stack([nll, correct.to(nll.dtype)])


def install_chunked_head(model: nn.Module, chunk_tokens: int, chunk_above_bytes: float = 0.0) -> Optional[str]:
    """Make the model's output layer a :class:`ChunkedLMHead` in place (its parameters, hooks and tying kept, so
    FSDP2, DeepSpeed and checkpoints see the same module), scoring ``chunk_tokens`` positions at a time where a
    micro-batch's logits would take more than ``chunk_above_bytes``. Returns why not, where it cannot be."""
    head = model.get_output_embeddings()
    transforms = [name for name in LOGIT_TRANSFORMS if getattr(model.config, name, None) not in (None, 1, 1.0)]
    if transforms:
        return f"the model transforms its logits after the head ({', '.join(transforms)})"
    if type(head) is not nn.Linear:
        return f"its output layer is a {type(head).__name__}, not a plain linear layer"
    head.__class__ = ChunkedLMHead  # only forward differs: same parameters, buffers and hooks
    head.chunk_tokens, head.chunk_above_bytes = chunk_tokens, chunk_above_bytes
    return None
