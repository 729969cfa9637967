"""The batches: typed, built only by the collate functions (here and :func:`sft_lightning.packing.collate_packed`).

Padding is masked by position (``attention_mask`` 0, label ``IGNORE_INDEX``), never by comparing ids with the
pad or eos id, so a tokenizer whose pad token is its end-of-turn token still trains the real end-of-turn.
Consumers branch on the batch's type (padded or packed), never on which fields exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, Optional, Union

import torch

from sft_lightning.render import IGNORE_INDEX


class _Batch:
    def to(self, device: torch.device | str, non_blocking: bool = False):
        """A copy with every tensor on ``device`` (Lightning moves a batch through this method too)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self) if torch.is_tensor(getattr(self, f.name))}
        return replace(self, **{name: t.to(device, non_blocking=non_blocking) for name, t in moved.items()})


@dataclass
class PaddedBatch(_Batch):
    """Conversations right-padded to the longest; ``attention_mask`` is 1 on real tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX where nothing is trained (prompt tokens, padding)
    sample_lengths: torch.Tensor  # real tokens per conversation, for throughput accounting
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
    sample_lengths: torch.Tensor
    step_supervised_tokens: Optional[int] = None


TrainingBatch = Union[PaddedBatch, PackedBatch]


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
    step_supervised_tokens: Optional[int] = None,
) -> PaddedBatch:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for the loss."""
    ids, attention_mask = pad_sequences(input_ids, pad_token_id)
    padded_labels, _ = pad_sequences(labels, IGNORE_INDEX)
    return PaddedBatch(ids, attention_mask, padded_labels, attention_mask.sum(1), step_supervised_tokens)


def collate_prompts(
    prompts: Sequence[Sequence[int]], pad_token_id: int, index: Optional[Sequence[int]] = None
) -> PromptBatch:
    """Left-padded prompts; ``index``: each prompt's record, carried along for the prediction writer."""
    ids, attention_mask = pad_sequences(prompts, pad_token_id, side="left")
    return PromptBatch(ids, attention_mask, None if index is None else torch.tensor(list(index)))
