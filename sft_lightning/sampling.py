"""Plan micro-batches per optimizer step so the loss can be normalised exactly.

The plan is a pure function of (sample sizes, epoch, seed, batch size, accumulation, world size), the same on
every rank, so each micro-batch knows how many supervised tokens its whole optimizer step holds across all
micro-batches and ranks without any communication. That number is what makes batch 8 x accumulation 1,
batch 2 x accumulation 4 and 2 ranks x batch 4 give the same update.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def plan_epoch(
    supervised_tokens: Sequence[int],
    batch_size: int,
    accumulate_grad_batches: int = 1,
    num_replicas: int = 1,
    rank: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> list[MicroBatch]:
    """This rank's micro-batches for one epoch, in order."""
    n = len(supervised_tokens)
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    global_size = batch_size * num_replicas
    global_batches = [order[i : i + global_size] for i in range(0, n, global_size)]
    if drop_last and global_batches and len(global_batches[-1]) < global_size:
        global_batches.pop()
    plan = []
    for step_start in range(0, len(global_batches), accumulate_grad_batches):
        step = global_batches[step_start : step_start + accumulate_grad_batches]
        step_tokens = sum(supervised_tokens[i] for batch in step for i in batch)
        for batch in step:
            if len(batch) == global_size:
                part = batch[rank * batch_size : (rank + 1) * batch_size]
            else:
                part = np.array_split(np.asarray(batch), num_replicas)[rank].tolist()
            plan.append(MicroBatch(tuple(part or batch[:1]), not part, step_tokens))
    return plan


class StepPlanSampler(DistributedSampler):
    """Yields this rank's :class:`MicroBatch` items; use with ``DataLoader(batch_size=None)``.

    It subclasses ``DistributedSampler`` because it already shards across ranks (without the padding by
    duplication that ``DistributedSampler`` does), and Lightning leaves such samplers in place.
    """

    def __init__(
        self,
        supervised_tokens: Sequence[int],
        batch_size: int,
        accumulate_grad_batches: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(supervised_tokens, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.supervised_tokens = list(supervised_tokens)
        self.batch_size = batch_size
        self.accumulate_grad_batches = accumulate_grad_batches
        self.drop_last_batch = drop_last

    def plan(self) -> list[MicroBatch]:
        return plan_epoch(
            self.supervised_tokens, self.batch_size, self.accumulate_grad_batches, self.num_replicas,
            self.rank, self.shuffle, self.seed, self.epoch, self.drop_last_batch,
        )

    def __iter__(self) -> Iterator[MicroBatch]:
        return iter(self.plan())

    def __len__(self) -> int:
        full, rest = divmod(len(self.supervised_tokens), self.batch_size * self.num_replicas)
        return full + (rest > 0 and not self.drop_last_batch)
