"""Tokenised splits: every conversation rendered and masked once, kept as flat arrays, cached on disk.

A split is three arrays (all samples' ``input_ids`` and ``labels`` end to end, and the offsets between them),
so a million conversations cost a few bytes per token instead of Python lists, and the cache is a folder of
``.npy`` files that later runs memory-map. The cache key covers everything the arrays depend on: the data
file's bytes, the tokenizer (vocabulary, merges, special tokens, chat template), ``max_length``, ``train_on``
and the source of the rendering code itself, so a stale cache can never be read.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Optional

import numpy as np

from sft_lightning import encoding, formats, preparing, records, render, render_once, sources
from sft_lightning.preparing import RenderSettings, Share, prepare, prepare_shared
from sft_lightning.errors import DataError
from sft_lightning.formats import Format
from sft_lightning.records import OnInvalid
from sft_lightning.sources import require_source
from sft_lightning.render import RenderedSample, SystemMessage, TrainOn

ARRAYS = {"input_ids": np.int32, "labels": np.int32, "offsets": np.int64, "supervised": np.int32}


@dataclass
class TokenizedSplit:
    """A split's kept samples as flat arrays, with what happened on the way (for the setup summary)."""

    path: str
    input_ids: np.ndarray  # int32, every kept sample end to end
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained
    offsets: np.ndarray  # int64, len(samples) + 1: sample i is [offsets[i], offsets[i + 1])
    supervised: np.ndarray  # int32, each sample's trained labels, its first label not counted
    read: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    expanded: int = 0  # conversations trained turn by turn: the template rewrites earlier turns in later prompts
    boundary: int = 0  # conversations whose ids differ from the whole text tokenised at once (a merge at a boundary)
    merged_system: int = 0  # system messages merged into the first user turn (a template without a system role)
    shares: dict[str, int] = field(default_factory=dict)  # tasks each rank rendered, when the split was prepared
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # Copies: the arrays may be read-only memory maps, which torch refuses to wrap.
        span = slice(self.offsets[index], self.offsets[index + 1])
        return self.input_ids[span].astype(np.int64), self.labels[span].astype(np.int64)

    def samples(self) -> list[RenderedSample]:
        return [RenderedSample(ids.tolist(), labels.tolist()) for ids, labels in map(self.sample, range(len(self)))]

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        return tuple(np.diff(self.offsets).tolist())

    @cached_property
    def supervised_tokens(self) -> tuple[int, ...]:
        """Per sample; its first label never counts, as nothing precedes it to predict it. Counted when the split
        was prepared, so that reading them touches no label of a memory-mapped split."""
        return tuple(self.supervised.tolist())

    def summary(self, name: str) -> str:
        return split_summary(name, self)

    @classmethod
    def load(cls, folder: Path, in_memory: bool = False) -> "TokenizedSplit":
        """The split written to ``folder`` (see :class:`_Writer`), memory-mapped, or read into memory."""
        read = np.fromfile if in_memory else partial(np.memmap, mode="r")
        arrays = {name: read(folder / f"{name}.bin", dtype=dtype) for name, dtype in ARRAYS.items()}
        return cls(**arrays, **json.loads((folder / "meta.json").read_text()), from_cache=not in_memory)


def split_summary(name: str, split) -> str:
    """The setup summary line of a tokenised file, or of a source's files together (the same counts)."""
    why = ", ".join(f"{count} {reason}" for reason, count in split.dropped.items()) or "none"
    expansion = "".join(f" ({count} conversations {what})" for count, what in [
        (split.expanded, "as one sample per assistant turn: the template renders earlier turns differently inside "
                         "later prompts"),
        (split.boundary, "tokenised prompt by prompt: a token would merge across a prompt/answer boundary if the "
                         "whole text were tokenised at once"),
    ] if count)
    merged = (f" ({split.merged_system} system messages merged into the first user turn: the template has no system "
              "role)" if split.merged_system else "")
    return (
        f"{name} ({split.path}{', cached' if split.from_cache else ''}): {split.read} conversations read, "
        f"{sum(split.dropped.values())} dropped ({why}), {split.truncated} truncated, {len(split)} kept"
        f"{expansion}{merged}, "
        f"{sum(split.supervised_tokens)} supervised tokens, mean length {sum(split.lengths) / max(len(split), 1):.1f} tokens"
    )


def tokenize_split(
    path: str,
    tokenizer,
    max_length: int,
    train_on: TrainOn,
    cache_dir: Optional[str] = None,
    workers: Optional[int] = None,
    on_invalid: OnInvalid = "error",
    format: Format = "auto",
    system_message: SystemMessage = "auto",
    split_special_tokens: bool = False,
    share: Optional[Share] = None,
) -> TokenizedSplit:
    """Read, render and mask ``path``; from ``cache_dir`` when this exact work was done before.

    ``workers``: processes that render in parallel (None: one per CPU for JSONL files of ``PARALLEL_BYTES`` or more
    and other files of ``PARALLEL_THRESHOLD`` conversations or more, else none; see :mod:`~sft_lightning.preparing`).
    ``on_invalid="skip"``: leave out conversations that fail validation or rendering, counted by reason in
    ``dropped``, instead of stopping at the first. ``share``: this process's part where the processes of a run
    prepare together (with a cache).
    """
    settings = RenderSettings(max_length, train_on, on_invalid, format, system_message, split_special_tokens)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="sft-lightning-") as staging:
            prepare(path, tokenizer, settings, workers, Path(staging))
            return TokenizedSplit.load(Path(staging), in_memory=True)
    folder = Path(cache_dir).expanduser() / cache_key(path, tokenizer, settings)
    fresh = not (folder / "meta.json").exists()
    if fresh or share is not None:  # every process of a share takes part, whatever it sees
        # Written beside the folder and renamed, so a killed run or a concurrent rank never leaves half a cache.
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent)) if fresh else None
        try:
            if share is None:
                prepare(path, tokenizer, settings, workers, staging)
                _publish(staging, folder)
            else:
                prepare_shared(path, tokenizer, settings, workers, staging, share, folder.parent / f".{folder.name}.parts",
                               done=not fresh, publish=lambda: _publish(staging, folder))
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    split = TokenizedSplit.load(folder)
    split.path, split.from_cache = path, not fresh
    return split


def _publish(staging: Path, folder: Path) -> None:
    """``staging`` renamed to ``folder``, unless another process did so first."""
    try:
        if not (folder / "meta.json").exists():
            os.rename(staging, folder)
    except OSError:
        if not (folder / "meta.json").exists():
            raise


def cache_key(path: str, tokenizer, settings: RenderSettings) -> str:
    found = require_source(path)
    digest = hashlib.sha256()
    # A save_to_disk folder: every file in it, by name and content.
    for file in sorted(found.rglob("*")) if found.is_dir() else [found]:
        if file.is_file():
            digest.update(str(file.relative_to(found)).encode() if found.is_dir() else b"")
            _hash_file(file, digest)
    for part in (
        tokenizer.backend_tokenizer.to_str(),
        tokenizer.chat_template,
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        repr(tuple(settings)),
        *(inspect.getsource(module) for module in (encoding, formats, preparing, records, render, render_once, sources, sys.modules[__name__])),
    ):
        digest.update(str(part).encode())
    return digest.hexdigest()[:24]


def _hash_file(path: Path, digest) -> None:
    try:
        with open(path, "rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise DataError(f"{path}: cannot read the file: {err.strerror or err}") from None
