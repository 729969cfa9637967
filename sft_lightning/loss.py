"""Token-exact causal LM loss.

The training objective of an optimizer step is the sum of token NLL over every supervised token of that step
(all micro-batches, all ranks) divided by their count. A micro-batch therefore contributes
``nll_sum / step_supervised_tokens``; the factor below undoes the ``1 / accumulate_grad_batches`` that Lightning
applies, the ``1 / world_size`` of the strategy's gradient averaging, and DeepSpeed's second division by the
accumulation count.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from sft_lightning.collate import SupervisedPositions
from sft_lightning.moe import RouterBalance


class TokenStats(NamedTuple):
    nll_sum: torch.Tensor  # float32 scalar
    supervised_tokens: int  # known on the host (the collate counted them)
    correct: torch.Tensor  # int scalar: argmax predictions equal to the label
    router: Optional[RouterBalance] = None  # a mixture-of-experts model in training: its load-balancing loss


def gather_supervised(values: torch.Tensor, positions: SupervisedPositions) -> torch.Tensor:
    """The vectors (logits, or the hidden states the LM head takes) that predict a supervised label,
    ``(supervised, features)``, out of those of the kept positions ``(rows, kept, features)``: gathered by the index
    the collate computed (a boolean mask here would read its count back from the device)."""
    return values.reshape(-1, values.shape[-1]).index_select(0, positions.index)


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """NLL sum, count and correct predictions of ``logits`` (supervised, vocab) against ``targets`` (supervised,).

    Only supervised positions go through the float32 softmax: less memory than upcasting every logit.
    """
    chosen = logits.float()
    nll_sum = F.cross_entropy(chosen, targets, reduction="sum")
    correct = (chosen.argmax(dim=-1) == targets).sum()
    return TokenStats(nll_sum, len(targets), correct)


def micro_batch_loss(nll_sum: torch.Tensor, step_supervised_tokens: int, framework_divisor: int) -> torch.Tensor:
    """The value to backpropagate so that the optimizer step sees the token mean of its whole step.

    ``framework_divisor`` is what Lightning and the strategy divide the loss (or the gradients) by on the way to
    the optimizer (``RunLayout.loss_divisor``, :mod:`sft_lightning.layout`).
    """
    return nll_sum * framework_divisor / max(int(step_supervised_tokens), 1)


class TokenMetrics(Metric):
    """Token-mean loss, perplexity and accuracy over a whole evaluation set (not a mean of batch means)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("supervised_tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, stats: TokenStats) -> None:
        self.nll_sum += stats.nll_sum.double()
        self.supervised_tokens += stats.supervised_tokens
        self.correct += stats.correct

    def compute(self) -> dict[str, torch.Tensor]:
        tokens = self.supervised_tokens.clamp(min=1)
        loss = self.nll_sum / tokens
        return {"loss": loss.float(), "ppl": loss.exp().float(), "acc": (self.correct / tokens).float()}


class EvaluationMetrics(torch.nn.Module):
    """An evaluation set's :class:`TokenMetrics` in total and, where it has several sources, per source (one for each
    evaluation loader, in the same order: :meth:`ChatMLDataModule.source_names`)."""

    def __init__(self, sources: Sequence[str] = ()) -> None:
        super().__init__()
        self.sources = list(sources)
        self.total = TokenMetrics()
        self.per_source = torch.nn.ModuleList(TokenMetrics() for _ in self.sources)

    def update(self, stats: TokenStats, loader: int = 0) -> None:
        self.total.update(stats)
        if self.sources:
            self.per_source[loader].update(stats)

    def compute(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(``{prefix}_loss``, ``_ppl``, ``_acc``; the same as ``{prefix}_loss/<source>`` for each source), then reset."""
        named = [("", self.total)] + [(f"/{source}", metrics) for source, metrics in zip(self.sources, self.per_source)]
        values = []
        for suffix, metrics in named:
            values.append({f"{prefix}_{name}{suffix}": value for name, value in metrics.compute().items()})
            metrics.reset()
        return values[0], {name: value for part in values[1:] for name, value in part.items()}
