"""The batches: typed, built only by the collate functions (here and :func:`sft_lightning.packing.collate_packed`).

Padding is masked by position (``attention_mask`` 0, label ``IGNORE_INDEX``), never by comparing ids with the
pad or eos id, so a tokenizer whose pad token is its end-of-turn token still trains the real end-of-turn.
Consumers branch on the batch's type (padded or packed), never on which fields exist.

Everything the training step needs to know about a batch's shape is computed here, on the host, while the batch is
still in host memory: which positions the LM head runs on and which of its outputs have a target
(:class:`SupervisedPositions`), the sample boundaries, the token counts for throughput (:class:`BatchCounts`). On a
GPU none of them is then read back from the device (each read would stop the host until the GPU catches up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, NamedTuple, Optional, Union

import torch

from sft_lightning.render import IGNORE_INDEX


class SupervisedPositions(NamedTuple):
    """Where the LM head runs and what it is scored against, for labels laid out as ``(rows, length)``.

    ``keep`` goes to the model as ``logits_to_keep`` (the same positions of every row); the kept logits are
    ``(rows, len(keep))``, and ``index`` picks, from them flattened, those whose next label is supervised, whose
    labels are ``targets``. Tensors, so they move with the batch.
    """

    keep: torch.Tensor  # int64 (kept,)
    index: torch.Tensor  # int64 (supervised,)
    targets: torch.Tensor  # int64 (supervised,)

    def to(self, device, non_blocking: bool = False) -> "SupervisedPositions":
        return SupervisedPositions(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> "SupervisedPositions":
        return SupervisedPositions(*(t.pin_memory() for t in self))


def supervised_positions(labels: torch.Tensor) -> SupervisedPositions:
    """The positions of ``labels`` (rows, length) whose next label is supervised in at least one row (where the LM
    head, a vocabulary-wide matmul, has to run: not on prompts and padding), and which of them have a target."""
    following = labels[:, 1:]
    keep = (following != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    kept = following[:, keep].reshape(-1)
    index = (kept != IGNORE_INDEX).nonzero().squeeze(1)
    return SupervisedPositions(keep, index, kept[index])


class BatchCounts(NamedTuple):
    """Host-side counts of a micro-batch, for throughput and MFU."""

    samples: int
    tokens: int  # real tokens
    supervised: int  # supervised labels: positions the LM head runs on
    slots: int  # tensor positions, padding included
    squared_lengths: int  # sum of each sample's length squared: attention FLOPs


def batch_counts(lengths: Sequence[int], supervised: int, slots: int) -> BatchCounts:
    return BatchCounts(len(lengths), sum(lengths), supervised, slots, sum(n * n for n in lengths))


def _moved(value, device, non_blocking: bool):
    return value.to(device, non_blocking=non_blocking) if isinstance(value, (torch.Tensor, SupervisedPositions)) else value


def _pinned(value):
    return value.pin_memory() if isinstance(value, (torch.Tensor, SupervisedPositions)) else value


class _Batch:
    def to(self, device: torch.device | str, non_blocking: Optional[bool] = None):
        """A copy with every tensor on ``device``. Lightning moves a batch through this method, without
        ``non_blocking`` for anything but a plain tensor: to a GPU the copy is asynchronous here by default (from the
        loader's pinned memory it then never waits; the caching allocator keeps the host block until it is done)."""
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        return replace(self, **{f.name: _moved(getattr(self, f.name), device, non_blocking) for f in fields(self)})

    def pin_memory(self):
        """A copy in page-locked memory (``DataLoader(pin_memory=True)`` calls this), so the copy to a GPU can be
        asynchronous."""
        return replace(self, **{f.name: _pinned(getattr(self, f.name)) for f in fields(self)})


@dataclass
class PaddedBatch(_Batch):
    """Conversations right-padded to the longest; ``attention_mask`` is 1 on real tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX where nothing is trained (prompt tokens, padding)
    supervision: SupervisedPositions
    counts: BatchCounts
    real_tokens: torch.Tensor  # bool: the tokens that count in per-token statistics (MoE router balance); none in a ghost
    # Supervised tokens of the whole optimizer step (every micro-batch on every rank): the loss's denominator.
    step_supervised_tokens: Optional[int] = None


@dataclass
class PackedBatch(_Batch):
    """Conversations laid end to end in rows; positions restart at 0 for each (see :func:`collate_packed`)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor  # each conversation's first label is IGNORE_INDEX, so no loss crosses a boundary
    cu_seq_lens: torch.Tensor  # int32 boundaries of every conversation (and row padding), rows end to end
    # The longest of them, a plain int computed once: variable-length kernels need it, and reading it off a GPU
    # tensor in every layer would stop the GPU each time.
    max_seq_len: int
    # The rows as they are (sdpa, eager: a block-diagonal mask per row) and laid end to end as one (varlen kernels).
    supervision_rows: SupervisedPositions
    supervision_flat: SupervisedPositions
    counts: BatchCounts
    real_tokens: torch.Tensor  # bool: the samples' tokens, not the rows' padding (none in a ghost micro-batch)
    step_supervised_tokens: Optional[int] = None


@dataclass
class PackedSlice(_Batch):
    """One rank's ``1/N`` of a packed micro-batch whose rows are laid end to end, for sequence parallelism.

    ``input_ids``, ``position_ids`` and ``real_tokens`` are this rank's tokens, shaped ``(1, length)``; ``cu_seq_lens``
    and ``max_seq_len`` are the whole micro-batch's (attention sees every token after the all-to-all);
    ``supervision`` counts positions from the slice's start; ``counts`` are this rank's share, so that sums over the
    ranks are the micro-batch's.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seq_lens: torch.Tensor
    max_seq_len: int
    supervision: SupervisedPositions
    counts: BatchCounts
    real_tokens: torch.Tensor
    step_supervised_tokens: Optional[int] = None


TrainingBatch = Union[PaddedBatch, PackedBatch, PackedSlice]


@dataclass
class PromptBatch(_Batch):
    """Prompts left-padded, so every row's next token is generated at the same position."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: Optional[torch.Tensor] = None  # each row's record in the prediction file


def pad_sequences(
    sequences: Sequence[Sequence[int]], value: int, side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``sequences`` into a ``(batch, longest)`` tensor filled with ``value``; also return the 0/1 mask."""
    longest = max(len(s) for s in sequences)
    padded = torch.full((len(sequences), longest), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(longest - len(sequence), longest)
        padded[row, span] = torch.as_tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return padded, mask


def collate_training(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int,
    step_supervised_tokens: Optional[int] = None, ghost: bool = False,
) -> PaddedBatch:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for the loss; ``ghost``: a stand-in micro-batch
    that trains nothing (a rank with no sample left in the last step), whose tokens count nowhere."""
    ids, attention_mask = pad_sequences(input_ids, pad_token_id)
    padded_labels, _ = pad_sequences(labels, IGNORE_INDEX)
    supervision = supervised_positions(padded_labels)
    counts = batch_counts([len(s) for s in input_ids], len(supervision.targets), ids.numel())
    real_tokens = attention_mask.bool() & (not ghost)
    return PaddedBatch(ids, attention_mask, padded_labels, supervision, counts, real_tokens, step_supervised_tokens)


def collate_prompts(
    prompts: Sequence[Sequence[int]], pad_token_id: int, index: Optional[Sequence[int]] = None
) -> PromptBatch:
    """Left-padded prompts; ``index``: each prompt's record, carried along for the prediction writer."""
    ids, attention_mask = pad_sequences(prompts, pad_token_id, side="left")
    return PromptBatch(ids, attention_mask, None if index is None else torch.tensor(list(index)))
