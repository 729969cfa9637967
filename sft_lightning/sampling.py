"""Plan micro-batches per optimizer step so the loss can be normalised exactly.

The plan is a pure function of (sample sizes, epoch, seed, batch size, accumulation, world size), the same on
every rank, so each micro-batch knows how many supervised tokens its whole optimizer step holds across all
micro-batches and ranks without any communication. That number is what makes batch 8 x accumulation 1,
batch 2 x accumulation 4 and 2 ranks x batch 4 give the same update.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DistributedSampler


class MicroBatch(NamedTuple):
    """What one rank runs in one forward/backward."""

    indices: tuple[int, ...]
    # True when the rank has no sample left in the final micro-batch: ``indices`` then holds a stand-in whose
    # labels are all masked, so every rank still runs the same number of steps and nothing is duplicated.
    ghost: bool
    step_supervised_tokens: int


@dataclass(frozen=True)
class StepPlan:
    """How one rank's micro-batches are drawn; :meth:`epoch` is pure, the same on every rank."""

    supervised_tokens: tuple[int, ...]  # per sample
    batch_size: int  # samples per micro-batch on each rank
    accumulate_grad_batches: int = 1
    num_replicas: int = 1
    rank: int = 0
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False

    def epoch(self, epoch: int = 0) -> list[MicroBatch]:
        """This rank's micro-batches for one epoch, in order."""
        n = len(self.supervised_tokens)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        global_size = self.batch_size * self.num_replicas
        global_batches = [order[i : i + global_size] for i in range(0, n, global_size)]
        if self.drop_last and global_batches and len(global_batches[-1]) < global_size:
            global_batches.pop()
        plan = []
        for start in range(0, len(global_batches), self.accumulate_grad_batches):
            step = global_batches[start : start + self.accumulate_grad_batches]
            step_tokens = sum(self.supervised_tokens[i] for batch in step for i in batch)
            for batch in step:
                # Contiguous parts: rank r of a full batch gets batch[r * batch_size : (r + 1) * batch_size].
                part = np.array_split(np.asarray(batch), self.num_replicas)[self.rank].tolist()
                plan.append(MicroBatch(tuple(part or batch[:1]), not part, step_tokens))
        return plan

    def __len__(self) -> int:
        full, rest = divmod(len(self.supervised_tokens), self.batch_size * self.num_replicas)
        return full + (rest > 0 and not self.drop_last)


class StepPlanSampler(DistributedSampler):
    """Yields this rank's :class:`MicroBatch` items; use with ``DataLoader(batch_size=None)``.

    It subclasses ``DistributedSampler`` because it already shards across ranks (without the padding by
    duplication that ``DistributedSampler`` does), and Lightning leaves such samplers in place. Lightning calls
    ``set_epoch`` on it, which reshuffles.
    """

    def __init__(self, plan: StepPlan) -> None:
        super().__init__(plan.supervised_tokens, plan.num_replicas, plan.rank, plan.shuffle, plan.seed)
        self.plan = plan

    def __iter__(self) -> Iterator[MicroBatch]:
        return iter(self.plan.epoch(self.epoch))

    def __len__(self) -> int:
        return len(self.plan)
