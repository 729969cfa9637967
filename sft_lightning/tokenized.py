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
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from rich.progress import Progress

from sft_lightning import encoding, formats, records, render, render_once, sources
from sft_lightning.errors import DataError, TemplateError
from sft_lightning.formats import Format
from sft_lightning.records import OnInvalid, Record, read_records
from sft_lightning.sources import require_source
from sft_lightning.render import IGNORE_INDEX, RenderedSample, SystemMessage, TrainOn, has_system_role, training_samples_batch

ARRAYS = ("input_ids", "labels", "offsets")
# Below this many conversations worker start-up costs more than it saves.
PARALLEL_THRESHOLD = 5000
CHUNK = 500


@dataclass
class TokenizedSplit:
    """A split's kept samples as flat arrays, with what happened on the way (for the setup summary)."""

    path: str
    input_ids: np.ndarray  # int32, every kept sample end to end
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained
    offsets: np.ndarray  # int64, len(samples) + 1: sample i is [offsets[i], offsets[i + 1])
    read: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    expanded: int = 0  # conversations trained turn by turn: the template rewrites earlier turns in later prompts
    boundary: int = 0  # conversations whose ids differ from the whole text tokenised at once (a merge at a boundary)
    merged_system: int = 0  # system messages merged into the first user turn (a template without a system role)
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
        """Per sample; its first label never counts, as nothing precedes it to predict it."""
        supervised = np.cumsum(np.concatenate([[0], self.labels != IGNORE_INDEX]))
        return tuple((supervised[self.offsets[1:]] - supervised[self.offsets[:-1] + 1]).tolist())

    def summary(self, name: str) -> str:
        return split_summary(name, self)

    def save(self, folder: Path) -> None:
        for name in ARRAYS:
            np.save(folder / f"{name}.npy", getattr(self, name))
        meta = {"path": self.path, "read": self.read, "truncated": self.truncated, "dropped": self.dropped,
                "expanded": self.expanded, "boundary": self.boundary, "merged_system": self.merged_system}
        (folder / "meta.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path) -> "TokenizedSplit":
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        return cls(**arrays, **json.loads((folder / "meta.json").read_text()), from_cache=True)


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
) -> TokenizedSplit:
    """Read, render and mask ``path``; from ``cache_dir`` when this exact work was done before.

    ``workers``: processes that render in parallel (None: one per CPU for files of at least
    ``PARALLEL_THRESHOLD`` conversations, else none). ``on_invalid="skip"``: leave out conversations that fail
    validation or rendering, counted by reason in ``dropped``, instead of stopping at the first.
    """
    settings = RenderSettings(max_length, train_on, on_invalid, format, system_message, split_special_tokens)
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir).expanduser() / cache_key(path, tokenizer, settings)
        if (folder / "meta.json").exists():
            split = TokenizedSplit.load(folder)
            split.path = path
            return split
    split = _tokenize(path, tokenizer, settings, workers)
    if folder is not None:
        _save_atomically(split, folder)
    return split


class RenderSettings(NamedTuple):
    """What, besides the file and the tokenizer, decides a split's arrays."""

    max_length: int
    train_on: TrainOn
    on_invalid: OnInvalid = "error"
    format: Format = "auto"
    system_message: SystemMessage = "auto"
    split_special_tokens: bool = False


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
        *(inspect.getsource(module) for module in (encoding, formats, records, render, render_once, sources, sys.modules[__name__])),
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


def _tokenize(path: str, tokenizer, settings: RenderSettings, workers: Optional[int]) -> TokenizedSplit:
    skipped = Counter() if settings.on_invalid == "skip" else None
    conversations = read_records(path, skipped=skipped, format=settings.format)
    if workers is None:
        workers = (os.cpu_count() or 1) if len(conversations) >= PARALLEL_THRESHOLD else 0
    chunks = [conversations[i : i + CHUNK] for i in range(0, len(conversations), CHUNK)]
    rendered: list[RenderedChunk] = []
    with Progress(transient=True, disable=len(chunks) < 4) as progress:
        task = progress.add_task(f"tokenizing {path}", total=len(conversations))
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # fork after the tokenizer's threads ran can deadlock
            with context.Pool(workers, _set_worker_tokenizer, (tokenizer, settings)) as pool:
                for chunk in pool.imap(_render_chunk, chunks):
                    rendered.append(chunk)
                    progress.advance(task, chunk.read)
        else:
            _set_worker_tokenizer(tokenizer, settings)
            rendered = [_render_chunk(chunk) for chunk in chunks]
    lengths = np.concatenate([chunk.lengths for chunk in rendered])
    if not len(lengths):
        raise DataError(f"{path}: no conversation has a supervised token within max_length={settings.max_length}")
    dropped = sum((chunk.dropped for chunk in rendered), skipped or Counter())
    return TokenizedSplit(
        path,
        input_ids=np.concatenate([chunk.input_ids for chunk in rendered]),
        labels=np.concatenate([chunk.labels for chunk in rendered]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        read=len(conversations) + sum((skipped or {}).values()),
        truncated=sum(chunk.truncated for chunk in rendered),
        dropped=dict(dropped),
        expanded=sum(chunk.expanded for chunk in rendered),
        boundary=sum(chunk.boundary for chunk in rendered),
        merged_system=sum(chunk.merged_system for chunk in rendered),
    )


class RenderedChunk(NamedTuple):
    """Up to ``CHUNK`` conversations rendered in one worker; arrays, so they cross processes cheaply."""

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    read: int
    truncated: int
    dropped: Counter  # by reason
    expanded: int  # conversations that gave one sample per assistant turn: the template rewrites history
    boundary: int  # ... the text chains, the tokens do not
    merged_system: int  # conversations whose system message went into the first user turn


_worker: dict = {}


def _set_worker_tokenizer(tokenizer, settings: RenderSettings) -> None:
    # Rendering merges a system message only under a template that has no system role (and data.system_message auto).
    _worker.update(tokenizer=tokenizer, settings=settings, merges_system=not has_system_role(tokenizer))


def _render_chunk(chunk: list[Record]) -> RenderedChunk:
    settings: RenderSettings = _worker["settings"]
    kept, truncated, dropped, merged = [], 0, Counter(), 0
    differs = Counter()
    results = training_samples_batch([(record.messages, record.tools) for record in chunk], _worker["tokenizer"],
                                     settings.train_on, settings.max_length, settings.system_message,
                                     settings.split_special_tokens)
    for record, samples in zip(chunk, results):
        if isinstance(samples, TemplateError):
            if settings.on_invalid == "error":
                raise DataError(f"{record.location}: {samples}") from None
            dropped[str(samples)] += 1
            continue
        differs[samples[0].differs] += 1
        merged += _worker["merges_system"] and record.messages[0]["role"] == "system"
        truncated += any(sample.truncated for sample in samples)
        trained = [sample for sample in samples if sample.supervised_tokens]
        kept.extend(trained)
        if not trained:
            dropped["with no supervised token left after truncation"] += 1
    return RenderedChunk(
        np.array([t for s in kept for t in s.input_ids], np.int32),
        np.array([t for s in kept for t in s.labels], np.int32),
        np.array([len(s.input_ids) for s in kept], np.int64),
        len(chunk), truncated, dropped, differs["history"], differs["boundary"], merged,
    )


def _save_atomically(split: TokenizedSplit, folder: Path) -> None:
    """Write beside ``folder`` and rename, so a killed run or a concurrent rank never leaves half a cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        split.save(staging)
        os.rename(staging, folder)
    except OSError:
        if not (folder / "meta.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
