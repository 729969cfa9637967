"""Plan micro-batches per optimizer step so the loss can be normalised exactly.

The plan is a pure function of (sample sizes, epoch, seed, batch size, accumulation, world size), the same on
every rank, so each micro-batch knows how many supervised tokens its whole optimizer step holds across all
micro-batches and ranks without any communication. That number is what makes batch 8 x accumulation 1,
batch 2 x accumulation 4 and 2 ranks x batch 4 give the same update.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DistributedSampler

# group_by_length sorts windows of this many global batches.
LENGTH_GROUP_WINDOW = 50


class MicroBatch(NamedTuple):
    """What one rank runs in one forward/backward."""

    indices: tuple[int, ...]
    # True when the rank has no sample left in the final micro-batch: ``indices`` then holds a stand-in whose
    # labels are all masked, so every rank still runs the same number of steps and nothing is duplicated.
    ghost: bool
    step_supervised_tokens: int


@dataclass(frozen=True)
class StepPlan:
    """How one rank's micro-batches are drawn; :meth:`epoch` is pure, the same on every rank.

    A unit is what a micro-batch holds ``batch_size`` of: a conversation, or a packed row of them.
    """

    supervised_tokens: tuple[int, ...]  # per unit
    batch_size: int  # units per micro-batch on each rank
    accumulate_grad_batches: int = 1
    num_replicas: int = 1
    rank: int = 0
    shuffle: bool = True
    seed: int = 0
    lengths: tuple[int, ...] = ()  # tokens per unit; needed to group by length
    group_by_length: bool = False
    max_tokens: Optional[int] = None  # padded tokens per micro-batch instead of a fixed ``batch_size``

    def epoch(self, epoch: int = 0) -> list[MicroBatch]:
        """This rank's micro-batches for one epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        global_batches = self._global_batches(generator)
        plan = []
        for start in range(0, len(global_batches), self.accumulate_grad_batches):
            step = global_batches[start : start + self.accumulate_grad_batches]
            step_tokens = sum(self.supervised_tokens[i] for batch in step for i in batch)
            for batch in step:
                # Contiguous parts: rank r of a full batch gets batch[r * batch_size : (r + 1) * batch_size].
                part = np.array_split(np.asarray(batch), self.num_replicas)[self.rank].tolist()
                plan.append(MicroBatch(tuple(part or batch[:1]), not part, step_tokens))
        return plan

    def trained_digest(self, epoch: int, micro_batches: int) -> str:
        """What the first ``micro_batches`` micro-batches of ``epoch`` hold on all ranks together (units and their
        supervised tokens): the same on every rank, and equal for a resumed run exactly when its plan counts the
        same samples as trained (another seed, batch size, packing or number of devices changes it)."""
        digest = hashlib.sha256()
        for batch in self.global_micro_batches(epoch)[:micro_batches]:
            digest.update(repr([(i, self.supervised_tokens[i]) for i in batch]).encode())
        return digest.hexdigest()[:16]

    def global_micro_batches(self, epoch: int) -> list[list[int]]:
        """The units of each micro-batch of ``epoch``, all ranks together, in the order they run (the same on every rank)."""
        return self._global_batches(torch.Generator().manual_seed(self.seed + epoch))

    def _global_batches(self, generator: torch.Generator) -> list[list[int]]:
        """Each micro-batch of all ranks together, in the order they run."""
        n = len(self.supervised_tokens)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        size = self.batch_size * self.num_replicas
        if self.max_tokens is not None:
            batches = [list(batch) for batch in self._token_budget_batches]
        elif self.group_by_length:
            # Sort within windows of LENGTH_GROUP_WINDOW batches: neighbours have similar lengths, yet which
            # conversations meet still changes from epoch to epoch.
            window = size * LENGTH_GROUP_WINDOW
            by_length = [
                i for w in range(0, n, window) for i in sorted(order[w : w + window], key=lambda i: -self.lengths[i])
            ]
            batches = [by_length[i : i + size] for i in range(0, n, size)]
        else:
            return [order[i : i + size] for i in range(0, n, size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        # The longest batch first, so a batch that does not fit in memory fails at step 1, not hours in.
        longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
        return [batches[longest]] + batches[:longest] + batches[longest + 1 :]

    @cached_property
    def _token_budget_batches(self) -> tuple[tuple[int, ...], ...]:
        """Batches cut from all units sorted by length, each as large as ``max_tokens`` per rank allows.

        Cut once, not per epoch (only their order changes), so every epoch has the same number of steps and
        the learning-rate schedule knows its length.
        """
        batches, current = [], []
        for i in sorted(range(len(self.lengths)), key=lambda i: (-self.lengths[i], i)):
            longest = self.lengths[current[0]] if current else self.lengths[i]
            if current and math.ceil((len(current) + 1) / self.num_replicas) * longest > self.max_tokens:
                batches.append(tuple(current))
                current = []
            current.append(i)
        return tuple(batches + [tuple(current)] if current else batches)

    def __len__(self) -> int:
        if self.max_tokens is not None:
            return len(self._token_budget_batches)
        full, rest = divmod(len(self.supervised_tokens), self.batch_size * self.num_replicas)
        return full + (rest > 0)


class StepPlanSampler(DistributedSampler):
    """Yields this rank's :class:`MicroBatch` items; use with ``DataLoader(batch_size=None)``.

    It subclasses ``DistributedSampler`` because it already shards across ranks (without the padding by
    duplication that ``DistributedSampler`` does), and Lightning leaves such samplers in place. ``set_epoch``
    reshuffles; a training loader sets its own position instead (:meth:`start_at`).
    """

    def __init__(self, plan: StepPlan) -> None:
        super().__init__(plan.supervised_tokens, plan.num_replicas, plan.rank, plan.shuffle, plan.seed)
        self.plan = plan
        self.skip = 0  # micro-batches of the epoch the next iterator leaves out

    def start_at(self, epoch: int, micro_batches_done: int) -> None:
        """The next iterator yields ``epoch`` after its first ``micro_batches_done`` micro-batches (a training
        loader's position, :class:`~sft_lightning.loaders.ResumableLoader`, set before each iterator it draws)."""
        self.epoch, self.skip = epoch, micro_batches_done

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.skip = 0

    def __iter__(self) -> Iterator[MicroBatch]:
        return iter(self.plan.epoch(self.epoch)[self.skip :])

    def __len__(self) -> int:
        return len(self.plan)


class Batching(NamedTuple):
    """How a split is batched and what it costs in padding (the setup summary, ``data check``)."""

    how: str  # "packed N conversations into M rows of <= L tokens", "grouped by length", or "" (plain)
    padding: float  # share of the micro-batch tensor slots that hold padding
    plain_padding: Optional[float]  # the same without packing or grouping; None when batching is plain

    def __str__(self) -> str:
        if self.plain_padding is None:
            return f"padding {self.padding:.1%} of the batch tokens"
        return f"{self.how}; padding {self.padding:.1%} of the batch tokens ({self.plain_padding:.1%} without)"


def padding_fraction(plan: StepPlan) -> float:
    """Share of the micro-batch tensor slots that hold padding over one epoch."""
    slots = tokens = 0
    for micro in plan.epoch(0):
        lengths = [plan.lengths[i] for i in micro.indices]
        slots += len(lengths) * max(lengths)
        tokens += sum(lengths)
    return 1 - tokens / slots
