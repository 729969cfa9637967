"""Pad variable-length samples into batch tensors.

Padding is masked by position (``attention_mask`` 0, label ``IGNORE_INDEX``), never by comparing ids with the
pad or eos id, so a tokenizer whose pad token is its end-of-turn token still trains the real end-of-turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from sft_lightning.render import IGNORE_INDEX


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
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for the loss (``sample_lengths`` for accounting)."""
    ids, attention_mask = pad_sequences(input_ids, pad_token_id)
    padded_labels, _ = pad_sequences(labels, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": attention_mask, "labels": padded_labels, "sample_lengths": attention_mask.sum(1)}


def collate_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts, so every row's next token is generated at the same position."""
    ids, attention_mask = pad_sequences(prompts, pad_token_id, side="left")
    return {"input_ids": ids, "attention_mask": attention_mask}
