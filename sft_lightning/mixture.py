"""A split drawn from several sources: how many samples each gives per epoch, which ones, and the summary.

The draw is a pure function of the sources' sizes, their weights or counts and ``data.seed``, so every rank and
a resumed run draw the same samples. It is drawn once per run, like ``datasets.interleave_datasets`` (a
subsampled source trains on the same subset every epoch; another seed draws another); the drawn samples are then
batched as one split (:class:`~sft_lightning.sampling.StepPlan`: shuffled across sources each epoch when
``data.shuffle``; packed into rows once when ``data.packing``).

The unit is the training sample: a conversation, or one turn of it under a template that rewrites earlier turns
(the setup summary counts those).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from functools import cached_property
from typing import Literal, Optional

import numpy as np

from sft_lightning.errors import DataError
from sft_lightning.sources import Source
from sft_lightning.tokenized import TokenizedSplit, split_summary


WeightBy = Literal["conversations", "tokens"]


def token_quotas(sizes: list[int], tokens: list[int], weights: list[Optional[float]],
                 counts: list[Optional[int]]) -> list[int]:
    """Samples per epoch from each source when weights share supervised tokens: a weighted source's quota is its share
    of the weighted sources' combined supervised tokens divided by its own mean per sample (rounded, at least one
    sample); counts and unweighted sources as in :func:`quotas`."""
    result = quotas(sizes, [None] * len(sizes), counts)
    weighted = [i for i, weight in enumerate(weights) if weight is not None]
    total, weight_sum = sum(tokens[i] for i in weighted), sum(weights[i] for i in weighted)
    for i in weighted:
        mean = tokens[i] / sizes[i] if tokens[i] else 1.0
        result[i] = max(round(weights[i] / weight_sum * total / mean), 1)
    return result


def quotas(sizes: list[int], weights: list[Optional[float]], counts: list[Optional[int]]) -> list[int]:
    """Samples per epoch from each source: its count when given; its share of the weighted sources' combined
    size when weighted (largest remainders, so the shares add up exactly); else its size (every sample once)."""
    result = [count if count is not None else size for size, count in zip(sizes, counts)]
    weighted = [i for i, weight in enumerate(weights) if weight is not None]
    if not weighted:
        return result
    total, weight_sum = sum(sizes[i] for i in weighted), sum(weights[i] for i in weighted)
    exact = {i: weights[i] / weight_sum * total for i in weighted}
    for i in weighted:
        result[i] = math.floor(exact[i])
    by_remainder = sorted(weighted, key=lambda i: (math.floor(exact[i]) - exact[i], i))
    for i in by_remainder[: total - sum(result[i] for i in weighted)]:
        result[i] += 1
    return result


def draw(size: int, quota: int, seed: int, source_index: int) -> np.ndarray:
    """``quota`` indices into a source of ``size`` samples: the whole source in order ``quota // size`` times, then
    a seeded choice of the rest without repeats, in order (so a sample's repeats are about a pass apart)."""
    whole, rest = divmod(quota, size)
    rng = np.random.default_rng([seed % 2**63, source_index])  # numpy takes no negative seed; torch did
    chosen = np.sort(rng.permutation(size)[:rest]) if rest else np.array([], np.int64)
    return np.concatenate([np.tile(np.arange(size), whole), chosen]).astype(np.int64)


class SampleSet:
    """Tokenised files read as one sequence of samples: all of them in order, or those at ``picks`` (repeats
    allowed). What the plan, the packer and the loaders read (as they would one :class:`TokenizedSplit`)."""

    def __init__(self, parts: list[TokenizedSplit], picks: Optional[np.ndarray] = None) -> None:
        self.parts = parts
        part = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        local = np.concatenate([np.arange(len(p)) for p in parts])
        self._part, self._local = (part, local) if picks is None else (part[picks], local[picks])

    def __len__(self) -> int:
        return len(self._part)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.parts[self._part[index]].sample(self._local[index])

    def _gather(self, values: list[tuple[int, ...]]) -> tuple[int, ...]:
        starts = np.cumsum([0] + [len(v) for v in values[:-1]])
        return tuple(np.concatenate(values)[starts[self._part] + self._local].tolist())

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        return self._gather([p.lengths for p in self.parts])

    @cached_property
    def supervised_tokens(self) -> tuple[int, ...]:
        return self._gather([p.supervised_tokens for p in self.parts])


class SourceSamples(SampleSet):
    """One source's kept samples (all its files), with their reading counts summed, and the indices drawn."""

    def __init__(self, source: Source, parts: list[TokenizedSplit], drawn: np.ndarray) -> None:
        super().__init__(parts)
        self.source, self.drawn = source, drawn
        self.path = source.path if len(parts) == 1 else f"{source.path}: {len(parts)} files"
        for name in ("read", "truncated", "expanded", "boundary", "merged_system"):
            setattr(self, name, sum(getattr(p, name) for p in parts))
        self.dropped = dict(sum((Counter(p.dropped) for p in parts), Counter()))
        self.from_cache = all(p.from_cache for p in parts)

    def summary(self, name: str) -> str:
        return split_summary(name, self)


class Mixture(SampleSet):
    """A split as trained on: the samples drawn from each source (:attr:`sources`), one after another."""

    def __init__(self, sources: list[Source], parts: list[list[TokenizedSplit]], seed: int, option: str,
                 weight_by: WeightBy = "conversations") -> None:
        sizes = [sum(len(p) for p in files) for files in parts]
        weights, counts = [s.weight for s in sources], [s.conversations for s in sources]
        self.weight_by = weight_by
        if weight_by == "tokens":
            tokens = [sum(sum(p.supervised_tokens) for p in files) for files in parts]
            planned = token_quotas(sizes, tokens, weights, counts)
        else:
            planned = quotas(sizes, weights, counts)
        for source, quota in zip(sources, planned):
            if quota == 0:
                raise DataError(f"data.{option}: {source.path}: weight {source.weight:g} is too small to draw a single sample")
        self.seed = seed
        self.sources = [
            SourceSamples(source, files, draw(size, quota, seed, i))
            for i, (source, files, size, quota) in enumerate(zip(sources, parts, sizes, planned))
        ]
        starts = np.cumsum([0] + sizes[:-1])
        super().__init__([p for files in parts for p in files],
                         np.concatenate([start + s.drawn for start, s in zip(starts, self.sources)]))

    @cached_property
    def source_of_sample(self) -> np.ndarray:
        """Each sample's source (its index in :attr:`sources`)."""
        return np.repeat(np.arange(len(self.sources)), [len(s.drawn) for s in self.sources])

    def cumulative_source_tokens(self, batches: list[list[int]], rows: Optional[list[list[int]]] = None) -> np.ndarray:
        """Row ``j``: the supervised tokens of each source in the first ``j`` of ``batches`` (each a list of units:
        samples, or packed ``rows`` of samples)."""
        per_sample = np.zeros((len(self), len(self.sources)), np.int64)
        per_sample[np.arange(len(self)), self.source_of_sample] = self.supervised_tokens
        units = per_sample if rows is None else np.stack([per_sample[row].sum(0) for row in rows])
        steps = [units[batch].sum(0) for batch in batches]
        return np.concatenate([np.zeros((1, len(self.sources)), np.int64), np.cumsum(steps, axis=0)])

    @property
    def mixed(self) -> bool:
        """More than one source, or one drawn otherwise than every sample once."""
        return len(self.sources) > 1 or len(self.sources[0].drawn) != len(self.sources[0])

    def fingerprint(self) -> dict:
        """What a saved data position counts over: each source's kept and drawn samples, and a digest of the
        samples drawn (their order and lengths: another seed, or edited data, changes it)."""
        digest = hashlib.sha256(np.asarray(self.lengths, np.int64).tobytes())
        digest.update(np.concatenate([s.drawn for s in self.sources]).tobytes())
        return {"counts": [[len(s), len(s.drawn)] for s in self.sources], "digest": digest.hexdigest()[:16]}

    def check_position(self, saved: Optional[dict]) -> None:
        """Refuse a saved data position (its :meth:`fingerprint`) counted over other samples than these: resuming
        there would replay or skip samples."""
        current = self.fingerprint()
        if saved is None or saved == current:
            return
        counts = [list(c) for c in saved["counts"]]
        what = (f"sources of {_counts(counts)} (kept/drawn samples) and this run has {_counts(current['counts'])}"
                if counts != current["counts"] else "other samples in the same counts (edited data, or another data.seed)")
        raise DataError(
            f"data.train_path: the checkpoint trained on {what}: resuming at its data position would replay or skip "
            "samples; give it the checkpoint's data, weights and seed, or start a new run from the exported hf_model/"
        )

    def summary(self, name: str) -> str:
        """The setup summary: each source as read, then (for a real mixture) its share planned and drawn."""
        if not self.mixed:  # one source, every sample once (its files counted together)
            return split_summary(name, self.sources[0])
        lines = [s.summary(f"{name} source {i + 1}/{len(self.sources)}") for i, s in enumerate(self.sources)]
        total_tokens = sum(self.supervised_tokens)
        lines.append(f"{name} mixture (drawn once from data.seed {self.seed}): {len(self)} samples per epoch, "
                     f"{total_tokens} supervised tokens")
        expected = [len(s.drawn) * sum(s.supervised_tokens) / len(s) for s in self.sources]
        weighted = [i for i, s in enumerate(self.sources) if s.source.weight is not None]
        if self.weight_by == "tokens" and weighted:  # the weights share the weighted sources' tokens exactly
            pool, weight_sum = sum(expected[i] for i in weighted), sum(self.sources[i].source.weight for i in weighted)
            for i in weighted:
                expected[i] = self.sources[i].source.weight / weight_sum * pool
        for i, (source, tokens_planned) in enumerate(zip(self.sources, expected)):
            tokens = sum(source.supervised_tokens[j] for j in source.drawn)
            lines.append(
                f"  {i + 1} {source.source.path} ({_share_setting(source.source, self.weight_by)}): samples "
                f"{_planned_share(source, self)} planned, {len(source.drawn)} drawn = "
                f"{len(source.drawn) / len(self):.1%} ({_repeats(source)}); "
                f"supervised tokens {tokens_planned / sum(expected):.1%} planned, {tokens} drawn = "
                f"{tokens / max(total_tokens, 1):.1%}"
            )
        return "\n".join(lines)


def _share_setting(source: Source, weight_by: WeightBy = "conversations") -> str:
    if source.weight is not None:
        return f"weight {source.weight:g}" + (" of supervised tokens" if weight_by == "tokens" else "")
    return f"conversations {source.conversations}" if source.conversations is not None else "every sample once"


def _planned_share(source: SourceSamples, mixture: Mixture) -> str:
    """The share of samples the settings ask for, before rounding to whole samples (weights in supervised tokens ask
    for a share of tokens: the samples are what that share drew)."""
    weighted = [s for s in mixture.sources if s.source.weight is not None]
    if source.source.weight is None or mixture.weight_by == "tokens":
        return f"{len(source.drawn) / len(mixture):.1%}"
    weighted_size = sum(len(s.drawn) for s in weighted)
    exact = source.source.weight / sum(s.source.weight for s in weighted) * weighted_size
    return f"{exact / len(mixture):.1%}"


def _repeats(source: SourceSamples) -> str:
    times = np.bincount(source.drawn, minlength=len(source))
    if times.max() <= 1:
        return f"{int((times == 1).sum())} of {len(source)} kept, none twice"
    return f"from {len(source)} kept, each {int(times.min())}-{int(times.max())} times"


def _counts(counts: list) -> str:
    return ", ".join(f"{kept}/{drawn}" for kept, drawn in counts)
