"""What the model does differently under each strategy, in one place per strategy: how it is built (with or without
its pretrained weights), what its first forward needs, when the optimizer steps, which optimizer, whether generation
must run on every rank together, and what ends with the run.

:class:`StrategyModel` is the single-device and DDP behaviour; ``zero.DeepSpeedModel`` and ``sharding.FSDP2Model``
are DeepSpeed's and FSDP2's. :func:`strategy_model` picks one, once, when the module builds its model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

from sft_lightning.errors import ConfigError
from sft_lightning.language_model import init_buffers

# A causal LM with the run's settings: ``causal_lm(pretrained)``.
CausalLM = Callable[[bool], nn.Module]


class StrategyModel:
    """One process, or DDP: the model whole on every rank."""

    sharded = False  # the weights are split over the ranks: generation runs on every rank together
    deepspeed: Optional[dict[str, Any]] = None  # the DeepSpeed config, under DeepSpeed
    sequence_group = None  # the process group a micro-batch's slices exchange attention heads in (sequence parallelism)
    _prepared = False

    def build(self, causal_lm: CausalLM, pretrained: bool, materialize: bool = True) -> nn.Module:
        """The model with its pretrained weights, or without them: parameters in empty host memory, ready to take a
        checkpoint's, or with ``materialize`` False still on the meta device (for ``load_state_dict(assign=True)``)."""
        if pretrained:
            return causal_lm(True)
        with torch.device("meta"):
            model = causal_lm(False)
        if materialize:
            model.to_empty(device="cpu")
            model.tie_weights()  # to_empty gives each tied module a tensor of its own
            init_buffers(model)
        return model

    def before_forward(self, model: nn.Module) -> None:
        """Called before every forward: once, what the model needs after the strategy has set it up."""
        if not self._prepared:
            self._prepared = True
            self.prepare(model)

    def prepare(self, model: nn.Module) -> None:
        """What the built model needs once the strategy has set it up, before it computes anything."""

    def at_optimizer_step(self) -> bool:
        """Whether the optimizer hooks Lightning calls now precede an optimizer step."""
        return True

    def optimizer(self, groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        """AdamW over ``groups`` (:func:`decay_groups`)."""
        return torch.optim.AdamW(groups, lr=lr, betas=betas)

    def teardown(self) -> None:
        """What ends with the run in this process."""


def decay_groups(parameters: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """The trained parameters in two optimizer groups: matrices decayed, biases and norm weights (1-D) not, since
    decaying them only hurts. A ZeRO-3 parameter is an empty 1-D placeholder: its shape is ``ds_shape``."""
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in parameters]
    return [
        {"params": [p for p, is_matrix in zip(parameters, matrix) if is_matrix], "weight_decay": weight_decay},
        {"params": [p for p, is_matrix in zip(parameters, matrix) if not is_matrix], "weight_decay": 0.0},
    ]


def strategy_model(strategy: Optional[Strategy], trains_adapters: bool) -> StrategyModel:
    """The model's behaviour under ``strategy`` (None: no trainer, as in export and chat)."""
    # Imported here: zero.py and sharding.py define their classes on top of this module's.
    from sft_lightning.sharding import FSDP2Model, FSDP2Strategy
    from sft_lightning.zero import DeepSpeedModel, deepspeed_config

    if isinstance(strategy, FSDP2Strategy):
        if trains_adapters:
            raise ConfigError("FSDP2Strategy trains every weight; LoRA and QLoRA fit one GPU: use trainer.strategy ddp")
        return FSDP2Model(strategy)
    if isinstance(strategy, ModelParallelStrategy):
        raise ConfigError(f"{type(strategy).__name__}: for sharded training use sft_lightning.sharding.FSDP2Strategy")
    config = deepspeed_config(strategy)
    return StrategyModel() if config is None else DeepSpeedModel(strategy, config)


# Our names to transformers' scheduler names; "constant" still warms up.
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def warmup_schedule(optimizer, name: str, warmup_ratio: float, total_steps: int) -> dict:
    """Lightning's per-step scheduler entry: a linear warmup over ``warmup_ratio`` of ``total_steps``, then ``name``."""
    from transformers import get_scheduler

    scheduler = get_scheduler(SCHEDULERS[name], optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return {"scheduler": scheduler, "interval": "step"}
