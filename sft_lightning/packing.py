"""Pack tokenised samples into rows of at most ``capacity`` tokens without letting them see each other.

Pure: no model and no Lightning. A packed row carries ``position_ids`` that restart at 0 for every sample and
no ``attention_mask``: transformers then derives the sample boundaries from the position ids and builds a
block-diagonal causal mask (sdpa, eager), or runs FlashAttention's variable-length kernel on rows laid end to
end. The first label of every sample is masked, so no token is ever trained to predict the next sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from sft_lightning.collate import BatchCounts, PackedBatch, PackedSlice, batch_counts, supervised_positions
from sft_lightning.render import IGNORE_INDEX


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sample indices into rows whose lengths sum to at most ``capacity``.

    Longest sample first, each into the row with the least room that still fits it (best-fit decreasing; on
    long-tailed chat data it fills rows to within a percent or two). Deterministic, so every rank and every
    resumed run builds the same rows. Rows are returned in the order they were opened.
    """
    too_long = [i for i, length in enumerate(lengths) if length > capacity]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, more than a row of {capacity}")
    rows: list[list[int]] = []
    # rows_with_room[r]: the rows with exactly r free tokens. Scanning r upward from a sample's length finds the
    # best fit; a scan that finds nothing opens a row, so failed scans cost about one capacity per row in all.
    rows_with_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        room = next((r for r in range(length, capacity + 1) if rows_with_room[r]), None)
        if room is None:
            row, room = len(rows), capacity
            rows.append([])
        else:
            row = rows_with_room[room].pop()
        rows[row].append(index)
        rows_with_room[room - length].append(row)
    return rows


def collate_packed(
    rows: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]], pad_token_id: int,
    step_supervised_tokens: Optional[int] = None, ghost: bool = False,
) -> PackedBatch:
    """``(input_ids, labels)`` samples grouped in rows to ``input_ids``, ``position_ids``, ``labels`` tensors.

    Rows are right-padded to the longest row; the padding is a separate pseudo-sample (its positions restart
    at 0 too) whose labels are ignored, so no real token attends to it. ``cu_seq_lens`` holds the boundaries of
    every sample and padding over the rows laid end to end (for variable-length attention), ``max_seq_len`` the
    longest of them; ``ghost``: a stand-in micro-batch that trains nothing, whose tokens count nowhere.
    """
    longest = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    real_tokens = torch.zeros((len(rows), longest), dtype=torch.bool)
    sample_lengths, bounds = [], [0]
    for r, row in enumerate(rows):
        start = 0
        for ids, sample_labels in row:
            end = start + len(ids)
            input_ids[r, start:end] = torch.as_tensor(ids, dtype=torch.long)
            labels[r, start + 1 : end] = torch.as_tensor(sample_labels[1:], dtype=torch.long)
            position_ids[r, start:end] = torch.arange(len(ids))
            sample_lengths.append(len(ids))
            bounds.append(r * longest + end)
            start = end
        real_tokens[r, :start] = not ghost
        if start < longest:
            position_ids[r, start:] = torch.arange(longest - start)
            bounds.append((r + 1) * longest)
    rows_supervision = supervised_positions(labels)
    return PackedBatch(
        input_ids, position_ids, labels, cu_seq_lens=torch.tensor(bounds, dtype=torch.int32),
        max_seq_len=max(end - start for start, end in zip(bounds, bounds[1:])),
        supervision_rows=rows_supervision, supervision_flat=supervised_positions(labels.reshape(1, -1)),
        counts=batch_counts(sample_lengths, len(rows_supervision.targets), input_ids.numel()),
        real_tokens=real_tokens, step_supervised_tokens=step_supervised_tokens,
    )


def slice_packed(batch: PackedBatch, rank: int, size: int) -> PackedSlice:
    """Rank ``rank``'s slice of ``batch`` among ``size`` ranks: its rows end to end, padded at the end to a multiple
    of ``size`` with one more pseudo-sample (id 0, ignored labels, attended by nothing else), cut into ``size`` equal
    parts. Host work on host tensors."""
    ids, positions, labels, real = (t.reshape(-1) for t in (batch.input_ids, batch.position_ids, batch.labels,
                                                           batch.real_tokens))
    total = len(ids)
    padded = -(-total // size) * size
    bounds, longest = batch.cu_seq_lens, batch.max_seq_len
    if padded > total:
        extra = padded - total
        ids = torch.cat([ids, torch.zeros(extra, dtype=ids.dtype)])
        positions = torch.cat([positions, torch.arange(extra, dtype=positions.dtype)])
        labels = torch.cat([labels, torch.full((extra,), IGNORE_INDEX, dtype=labels.dtype)])
        real = torch.cat([real, torch.zeros(extra, dtype=torch.bool)])
        bounds = torch.cat([bounds, torch.tensor([padded], dtype=bounds.dtype)])
        longest = max(longest, extra)
    length = padded // size
    start, end = rank * length, (rank + 1) * length
    # The slice's labels and the one after it: its last position predicts the next slice's first token.
    window = torch.cat([labels[start : end + 1], torch.full((1,), IGNORE_INDEX, dtype=labels.dtype)])[: length + 1]
    supervision = supervised_positions(window.reshape(1, -1))
    mine = real[start:end]
    counts = BatchCounts(
        samples=int(((positions[start:end] == 0) & mine).sum()),  # the samples that start here
        tokens=int(mine.sum()),
        supervised=len(supervision.targets),
        slots=length,
        # Each rank runs the attention of 1/size of the heads over every sample.
        squared_lengths=share(batch.counts.squared_lengths, rank, size),
    )
    return PackedSlice(
        ids[start:end].reshape(1, -1), positions[start:end].reshape(1, -1), bounds, longest, supervision, counts,
        mine.reshape(1, -1), batch.step_supervised_tokens,
    )


def share(total: int, rank: int, size: int) -> int:
    """Rank ``rank``'s part of ``total`` split as evenly as whole numbers allow (the parts sum to ``total``)."""
    return total // size + (rank < total % size)
