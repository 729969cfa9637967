"""The run layout: how the processes of a run share the work, and what the framework divides the loss by.

Built once from the trainer's strategy (:meth:`RunLayout.of`), when its processes exist, and handed to the data module
and the model by :class:`ConnectRunLayout`: the one place either learns the ranks, the sizes and the divisor, so that
the data's plan (which micro-batches each rank takes, how many make a step) and the model's loss scaling cannot
disagree. Under sequence parallelism (``FSDP2Strategy(sequence_parallel_size=N)``) the ``N`` consecutive ranks of a
sequence group take the same micro-batches and split each along its length, so the data-parallel size is the number
of processes divided by ``N``; the gradients are still averaged over every process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from sft_lightning.errors import ConfigError
from sft_lightning.zero import deepspeed_config


@dataclass(frozen=True)
class RunLayout:
    """One run's layout. The defaults are one process without accumulation (export, chat, a module on its own)."""

    processes: int = 1  # every process of the run (Lightning's world size)
    rank: int = 0  # this process among them
    data_parallel_size: int = 1  # the ranks that take different micro-batches
    data_parallel_rank: int = 0
    sequence_parallel_size: int = 1  # the ranks that split each micro-batch along its length (a sequence group)
    sequence_parallel_rank: int = 0  # this rank's slice within its group
    accumulation: int = 1  # micro-batches per optimizer step
    loss_divisor: int = 1  # what the framework divides a micro-batch's loss (or its gradients) by on the way to the step
    local_rank: int = 0  # this process among those of its node
    processes_per_node: int = 1  # which share the node's CPUs

    @property
    def distributed(self) -> bool:
        return self.processes > 1

    @classmethod
    def of(cls, trainer) -> "RunLayout":
        """The layout of ``trainer``'s run, read from its strategy once its processes are set up."""
        from sft_lightning.sharding import FSDP2Strategy  # sharding.py builds on strategy_model, which this precedes

        processes, rank, accumulation = trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches
        sequence = trainer.strategy.sequence_parallel_size if isinstance(trainer.strategy, FSDP2Strategy) else 1
        return cls(
            processes=processes,
            rank=rank,
            # Sequence groups are consecutive ranks (FSDP2Strategy's mesh): on one node where they fit, for the all-to-all.
            data_parallel_size=processes // sequence,
            data_parallel_rank=rank // sequence,
            sequence_parallel_size=sequence,
            sequence_parallel_rank=rank % sequence,
            accumulation=accumulation,
            loss_divisor=framework_divisor(deepspeed_config(trainer.strategy) is not None, accumulation, processes),
            local_rank=trainer.local_rank,
            processes_per_node=trainer.num_devices,
        )


def framework_divisor(deepspeed: bool, accumulation: int, processes: int) -> int:
    """What the framework divides a micro-batch's loss by before its gradient reaches the optimizer: Lightning the
    accumulation count, DDP/FSDP/DeepSpeed the processes the gradients are averaged over (every one, the ranks of a
    sequence group included: theirs hold different tokens' gradients), and DeepSpeed's ``engine.backward`` the
    accumulation count once more."""
    return accumulation * (accumulation if deepspeed else 1) * processes


def connected(layout: Optional[RunLayout], attached: bool, part: str) -> RunLayout:
    """``part``'s layout: the connected one; one process where it runs without a trainer (export, chat, data check,
    tests); refused in one line where a trainer runs it without :class:`ConnectRunLayout`."""
    if layout is not None:
        return layout
    if attached:
        raise ConfigError(f"the {part} has no run layout: give the Trainer the callback "
                          "sft_lightning.layout.ConnectRunLayout(model, datamodule) (the CLI does)")
    return RunLayout()


class TakesLayout(Protocol):
    def connect_layout(self, layout: RunLayout) -> None: ...


class ConnectRunLayout(Callback):
    """Builds the run layout when the strategy has set up the processes (``setup``: before any data loader, model
    build or optimizer) and connects each part to it. The CLI adds it; a ``Trainer`` used directly takes it as a
    callback: ``Trainer(callbacks=[ConnectRunLayout(model, datamodule)])``."""

    def __init__(self, *parts: TakesLayout) -> None:
        self.parts = parts

    def setup(self, trainer, pl_module, stage: str) -> None:
        layout = RunLayout.of(trainer)
        if layout.sequence_parallel_size > 1:
            rank_zero_info(f"run layout: {layout.processes} processes = {layout.data_parallel_size} data-parallel x "
                           f"{layout.sequence_parallel_size} sequence-parallel")
        for part in self.parts:
            part.connect_layout(layout)
