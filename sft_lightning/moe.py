"""Mixture-of-experts: the router's load-balancing loss, counted over everything a step's micro-batch holds.

transformers' MoE models (Qwen3-MoE, Qwen3.5-MoE, Mixtral, ...) return each layer's router logits when asked
(``output_router_logits``) and add ``router_aux_loss_coef`` times the Switch Transformer balancing loss to the loss
only when given labels, which this trainer never passes. The loss is ``num_experts * sum_i f_i * P_i``: ``f_i`` the
share of top-k assignments that went to expert ``i``, ``P_i`` its mean router probability, over every real token of
every layer (padding excluded, prompts included, as transformers counts).

Here ``f`` and the token count are summed over the data-parallel ranks before the loss is formed (Qwen's "global-batch"
balancing), so a micro-batch split over ``N`` ranks gets the same loss, and the same gradient, as on one: each rank
backpropagates its own tokens' share ``num_experts * sum_i f_i * P_i(local) / tokens(all ranks)``. Across the
micro-batches of an optimizer step the loss is their mean, as transformers' Trainer makes it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F


class MoE(NamedTuple):
    """What the balancing loss needs from a model's config."""

    coefficient: float
    num_experts: int
    top_k: int


def moe_of(config) -> Optional[MoE]:
    """The MoE settings of a transformers config, or None for a dense model."""
    coefficient = getattr(config, "router_aux_loss_coef", None)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if coefficient is None or not experts or not top_k:
        return None
    return MoE(float(coefficient), int(experts), int(top_k))


class RouterBalance(NamedTuple):
    local_loss: torch.Tensor  # this rank's share of the balancing loss, with gradient (sums to the loss over ranks)
    loss: torch.Tensor  # the micro-batch's balancing loss over all ranks, detached
    expert_load: torch.Tensor  # (layers, experts): share of the assignments each expert got, all ranks


def router_balance(
    router_logits: tuple[torch.Tensor, ...], counted: torch.Tensor, moe: MoE,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> RouterBalance:
    """The balancing loss of one micro-batch from each layer's ``(tokens, experts)`` router logits; ``counted``: a
    ``(tokens,)`` 0/1 mask of the real tokens (in the order the logits flatten them); ``reduce_sum``: sums a tensor
    over the data-parallel ranks (identity on one)."""
    weights = counted.reshape(-1, 1).float()
    assigned, probability = [], []
    for logits in router_logits:
        probabilities = F.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probabilities, moe.top_k, dim=-1).indices
        hits = torch.zeros_like(probabilities).scatter_(1, chosen, 1.0)  # top-k assignments, as counts
        assigned.append((hits * weights).sum(dim=0))
        probability.append((probabilities * weights).sum(dim=0))
    assigned_per_layer = torch.stack(assigned)  # (layers, experts), no gradient (topk)
    local_probability = torch.stack(probability).sum(dim=0)  # (experts,), with gradient
    tokens = weights.sum() * len(router_logits)  # token rows over all layers
    # One collective for what every rank must agree on: assignments, token rows and (for the log) probabilities.
    totals = reduce_sum(torch.cat([assigned_per_layer.reshape(-1), tokens.reshape(1), local_probability.detach()]))
    experts, layers = moe.num_experts, len(router_logits)
    all_assigned = totals[: layers * experts].reshape(layers, experts)
    all_tokens = totals[layers * experts].clamp(min=1)
    share = all_assigned.sum(dim=0) / all_tokens  # f_i: sums to top_k, as transformers counts it
    local_loss = experts * (share * local_probability).sum() / all_tokens
    loss = experts * (share * totals[layers * experts + 1 :]).sum() / all_tokens
    load = all_assigned / all_assigned.sum(dim=1, keepdim=True).clamp(min=1)
    return RouterBalance(local_loss, loss, load)


class StepRouter:
    """The balancing loss and expert load of an optimizer step: the mean over its micro-batches."""

    def __init__(self) -> None:
        self.loss: Optional[torch.Tensor] = None
        self.load: Optional[torch.Tensor] = None

    def add(self, balance: RouterBalance, micro_batches: int) -> None:
        loss, load = balance.loss.detach() / micro_batches, balance.expert_load / micro_batches
        self.loss = loss if self.loss is None else self.loss + loss
        self.load = load if self.load is None else self.load + load

    def metrics(self) -> dict[str, torch.Tensor]:
        """``train_aux_loss`` and, per layer, ``moe/load_imbalance/layer_N``: the busiest expert's share of the
        assignments over an even share (1: balanced; ``num_experts``: one expert takes everything), with the mean
        and the worst over layers."""
        if self.loss is None:
            return {}
        imbalance = self.load.max(dim=1).values * self.load.shape[1]
        metrics = {"train_aux_loss": self.loss, "moe/load_imbalance_mean": imbalance.mean(),
                   "moe/load_imbalance_max": imbalance.max()}
        metrics.update({f"moe/load_imbalance/layer_{layer}": value for layer, value in enumerate(imbalance)})
        return metrics
