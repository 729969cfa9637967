"""Preparation: a file's conversations read, rendered and masked in tasks, by worker processes and by every rank.

A task is a shard of a JSONL file (whole lines, which the worker reads itself) or a chunk of a JSON array's or a
table's records. A process renders its tasks through a pool of forked workers and appends each result to the
split's arrays as it comes (:class:`_Writer`), so memory holds a few tasks whatever the file's size.

In a run of several processes with a cache (:class:`Share`), every rank renders every ``processes``-th task into a
parts folder beside the cache entry, all wait (without a time limit: a group of its own, not the run's, whose timeout
would fire on a long preparation), the first rank of each node joins the parts into the entry (rendering any part its
node cannot see, so a cache folder that is not shared between nodes still works), all wait again, and every rank
reads the same arrays. Each wait is an exchange of errors through that group, not the file system: an error on any
rank is raised on every one, whichever node's folder it happened beside.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import json
import pickle
import shutil
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from itertools import chain
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np
from rich.console import Console
from rich.progress import Progress

from sft_lightning import records, sources
from sft_lightning.errors import DataError, SharedDataError, TemplateError
from sft_lightning.records import Record
from sft_lightning.render import IGNORE_INDEX, SystemMessage, TrainOn, has_system_role, training_samples_batch
from sft_lightning.formats import Format
from sft_lightning.layout import RunLayout
from sft_lightning.records import OnInvalid

# Below this many conversations (a JSON array's, a table's) or bytes (a JSONL file's) workers cost more than they save.
PARALLEL_THRESHOLD = 5000
PARALLEL_BYTES = 4 << 20
# A JSON array's or a table's conversations are rendered in chunks of MIN_CHUNK to CHUNK (a JSONL file's in shards of
# MIN_SHARD_BYTES to records.SHARD_BYTES), at least TASKS_PER_RENDERER of them for each process that renders.
CHUNK, MIN_CHUNK = 500, 50
MIN_SHARD_BYTES = 16 << 10
TASKS_PER_RENDERER = 4
RENDERERS_PER_PROCESS = 4  # counted for each process preparing together (a node's CPUs divided among its ranks)


class RenderSettings(NamedTuple):
    """What, besides the file and the tokenizer, decides a split's arrays."""

    max_length: int
    train_on: TrainOn
    on_invalid: OnInvalid = "error"
    format: Format = "auto"
    system_message: SystemMessage = "auto"
    split_special_tokens: bool = False


@dataclass(frozen=True)
class Share:
    """This process's part in preparing with the others of its run: it renders the tasks ``rank``, ``rank +
    processes``, ...; ``first_on_node`` joins the parts. ``gather(value)``: every process's value, in rank order, once
    every process has given its own (without a time limit)."""

    rank: int
    processes: int
    first_on_node: bool
    gather: Callable[[Optional[str]], list[Optional[str]]]

    @classmethod
    def of_run(cls, layout: RunLayout) -> "Share":
        """The share of a process of a ``torch.distributed`` run (every process must call this, in the same order)."""
        import torch.distributed as dist

        # A group of its own, on gloo, with no practical time limit: the run's may be NCCL with a timeout of minutes.
        group = dist.new_group(backend="gloo", timeout=timedelta(days=10_000))

        def gather(value: Optional[str]) -> list[Optional[str]]:
            values = [None] * layout.processes
            dist.all_gather_object(values, value, group=group)
            return values

        return cls(layout.rank, layout.processes, layout.local_rank == 0, gather)

    def settle(self, error: Optional[str]) -> None:
        """Wait for every process; then the first error any of them had (``error``: this one's, or None) is raised
        on all."""
        failed = [message for message in self.gather(error) if message is not None]
        if failed:
            raise SharedDataError(failed[0])

    def attempt(self, work: Callable[[], object]) -> tuple[object, Optional[str]]:
        """(``work()``, None), or (None, its error's message) for :meth:`settle` to raise on every process, rather
        than leave them waiting for this one."""
        try:
            return work(), None
        except Exception as err:
            return None, str(err) if isinstance(err, DataError) else f"rank {self.rank}: {err!r}"


def prepare(path: str, tokenizer, settings: RenderSettings, workers: Optional[int], folder: Path) -> None:
    """Read, render and mask ``path`` into the empty folder ``folder``, in this process (and its workers)."""
    tasks, skipped, workers = _planned(path, settings, workers)
    with _Writer(folder, path) as writer:
        for _, chunk in _rendered(tasks, range(len(tasks)), workers, tokenizer, settings, path):
            writer.add(0, chunk)
        writer.close(skipped, settings.max_length)


def prepare_shared(path: str, tokenizer, settings: RenderSettings, workers: Optional[int], folder: Optional[Path],
                   share: Share, parts: Path, done: bool, publish: Callable[[], None]) -> None:
    """:func:`prepare` by every process of a run together (each must call it), see the module: this process's tasks
    into ``parts``, then the first process on each node joins them into the empty ``folder`` and calls ``publish``.
    Returns once every node's entry is published; an error on any process is raised on all. ``done``: this
    process's node has the entry already (``folder`` None), so it renders nothing and only waits with the others."""
    planned, error = (None, None) if done else share.attempt(lambda: _planned(path, settings, workers, share.processes))
    if planned:
        tasks, _, workers = planned
        # Parts of a run killed before they were joined are taken over, where they cut the file the same way.
        plan = parts / _plan_name(tasks)

        def render_mine() -> None:
            plan.mkdir(parents=True, exist_ok=True)
            mine = [i for i in range(len(tasks)) if i % share.processes == share.rank and not _part(plan, i).exists()]
            for i, chunk in _rendered(tasks, mine, workers, tokenizer, settings, path):
                _save_part(plan, i, (share.rank, chunk))

        _, error = share.attempt(render_mine)
    try:
        share.settle(error)
        if planned and share.first_on_node:
            _, error = share.attempt(lambda: (_join(path, tokenizer, settings, planned, folder, share.rank, plan), publish()))
        share.settle(error)
    finally:
        # Joined, or left by an error every process raises: mostly the data's, fixed under a new cache key, where
        # they would never be read again (a retry re-renders). Parts of a killed run stay, for the next to take over.
        # Every process is past reading them; rendering the same file again finds its entry done.
        if share.first_on_node:
            shutil.rmtree(parts, ignore_errors=True)


def _plan_name(tasks: list) -> str:
    """A name for how ``tasks`` cut the file (shards' bytes, chunks' sizes)."""
    cuts = [(task.start, task.end) if isinstance(task, records.Shard) else len(task) for task in tasks]
    return hashlib.sha256(repr(cuts).encode()).hexdigest()[:16]


def _join(path: str, tokenizer, settings: RenderSettings, planned: tuple, folder: Path, rank: int, parts: Path) -> None:
    """The parts joined into ``folder``; parts this node cannot see (a cache folder nodes do not share) rendered here
    (by the process of ``rank``)."""
    tasks, skipped, workers = planned
    unseen = [i for i in range(len(tasks)) if not _part(parts, i).exists()]
    late = dict(_rendered(tasks, unseen, workers, tokenizer, settings, path))
    with _Writer(folder, path) as writer:
        for i in range(len(tasks)):
            writer.add(*((rank, late.pop(i)) if i in late else pickle.loads(_part(parts, i).read_bytes())))
        writer.close(skipped, settings.max_length)


def _planned(path: str, settings: RenderSettings, workers: Optional[int], processes: int = 0) -> tuple[list, Counter, int]:
    """The tasks, the invalid rows skipped while reading here, and the worker processes (``workers``, or by default
    one per CPU for a large enough file, else none). ``processes`` preparing together (0: this one alone) decide the
    tasks alone, so that every one of them cuts the file the same way, whatever its CPUs."""
    renderers = processes * RENDERERS_PER_PROCESS or max(workers or os.cpu_count() or 1, 1)
    tasks, skipped, enough = _tasks(path, settings, renderers)
    return tasks, skipped, ((os.cpu_count() or 1) if enough else 0) if workers is None else workers


def _tasks(path: str, settings: RenderSettings, renderers: int) -> tuple[list, Counter, bool]:
    """(tasks, invalid rows skipped while reading here, whether the file is large enough for workers): at least
    ``TASKS_PER_RENDERER`` tasks for each of the ``renderers`` processes that will render them, where the file allows."""
    found = sources.require_source(path)
    skipped = Counter()
    wanted = TASKS_PER_RENDERER * renderers
    size = found.stat().st_size if found.is_file() else 0
    shards = records.jsonl_shards(found, min(records.SHARD_BYTES, max(MIN_SHARD_BYTES, size // wanted)))
    if shards is not None:
        return shards, skipped, size >= PARALLEL_BYTES
    # A JSON array or a table: read whole, rendered in chunks.
    counted = skipped if settings.on_invalid == "skip" else None
    conversations = records.validated(records.whole_file_rows(found, counted), True, counted, settings.format)
    size = min(CHUNK, max(MIN_CHUNK, -(-len(conversations) // wanted)))
    chunks = [conversations[i : i + size] for i in range(0, len(conversations), size)]
    return chunks, skipped, len(conversations) >= PARALLEL_THRESHOLD


def _rendered(tasks: list, indices, workers: int, tokenizer, settings: RenderSettings,
              path: str) -> Iterator[tuple[int, "RenderedChunk"]]:
    """(index, rendered chunk) of the tasks at ``indices``, in order, with a progress bar."""
    indices = list(indices)
    # On a terminal only (a log gets the rate in the setup summary), and not for a few tasks.
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=len(indices) < 4 or not console.is_terminal) as progress:
        bar = progress.add_task(f"tokenizing {path}", total=len(indices))
        with _workers(workers, tokenizer, settings) as pool:
            chosen = [tasks[index] for index in indices]
            for index, chunk in zip(indices, pool.imap(_render_task, chosen) if pool else map(_render_task, chosen)):
                progress.advance(bar)
                yield index, chunk


def _part(parts: Path, index: int) -> Path:
    return parts / f"{index:07d}.pkl"


def _save_part(parts: Path, index: int, chunk: tuple[int, "RenderedChunk"]) -> None:
    staging = parts / f".{index:07d}-{os.getpid()}"
    staging.write_bytes(pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(staging, _part(parts, index))


@contextmanager
def _workers(count: int, tokenizer, settings: RenderSettings):
    """A pool of ``count`` processes that render (None for fewer than two: this process renders)."""
    _set_worker_tokenizer(tokenizer, settings)
    if count < 2:
        yield None
        return
    # Forked, so that workers start at once with the tokenizer in place; sequential tokenizers in them (their
    # thread pool does not survive a fork), said through the variable so that tokenizers does not warn about it.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks", category=DeprecationWarning)
            pool = context.Pool(count, _set_worker_tokenizer, (tokenizer, settings))
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    with pool:
        yield pool


class _Writer:
    """The kept samples of each chunk appended to the split's arrays in ``folder``, as they come; a context whose
    end closes the arrays' files, whether or not the split was finished (:meth:`close`)."""

    def __init__(self, folder: Path, path: str):
        self.folder, self.path = folder, path
        self.files = {name: open(folder / f"{name}.bin", "wb") for name in ("input_ids", "labels", "supervised")}
        self.lengths: list[np.ndarray] = []
        self.counts, self.invalid, self.dropped, self.shares = Counter(), Counter(), Counter(), Counter()

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *failure) -> None:
        for file in self.files.values():
            file.close()

    def add(self, rank: int, chunk: "RenderedChunk") -> None:
        """``chunk``, the next task's, as rendered by the process of ``rank``."""
        self.shares[rank] += 1
        chunk.input_ids.tofile(self.files["input_ids"])
        chunk.labels.tofile(self.files["labels"])
        chunk.supervised.tofile(self.files["supervised"])
        self.lengths.append(chunk.lengths)
        self.invalid.update(chunk.invalid)
        self.dropped.update(chunk.dropped)
        self.counts.update(read=chunk.read, truncated=chunk.truncated, expanded=chunk.expanded,
                           boundary=chunk.boundary, merged_system=chunk.merged_system)

    def close(self, skipped: Counter, max_length: int) -> None:
        """Finish the arrays; ``skipped``: invalid rows left out before the chunks (a JSON array's, a table's)."""
        for file in self.files.values():
            file.close()
        invalid = skipped + self.invalid
        if not self.counts["read"]:
            left_out = f" ({sum(invalid.values())} invalid ones skipped)" if invalid else ""
            raise DataError(f"{self.path}: the file holds no conversation{left_out}")
        lengths = np.concatenate(self.lengths)
        if not len(lengths):
            raise DataError(f"{self.path}: no conversation has a supervised token within max_length={max_length}")
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(self.folder / "offsets.bin")
        meta = {"path": self.path, "read": self.counts["read"] + sum(invalid.values()),
                "dropped": dict(invalid + self.dropped),
                **{key: self.counts[key] for key in ("truncated", "expanded", "boundary", "merged_system")},
                "shares": {str(rank): tasks for rank, tasks in sorted(self.shares.items())}}
        (self.folder / "meta.json").write_text(json.dumps(meta))


class RenderedChunk(NamedTuple):
    """A shard's (or up to ``CHUNK``) conversations rendered in one worker; arrays, so they cross processes cheaply."""

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    supervised: np.ndarray  # each kept sample's supervised tokens
    read: int  # valid conversations
    invalid: Counter  # rows left out while reading (on_invalid skip), by reason
    truncated: int
    dropped: Counter  # conversations left out while rendering, by reason
    expanded: int  # conversations that gave one sample per assistant turn: the template rewrites history
    boundary: int  # ... the text chains, the tokens do not
    merged_system: int  # conversations whose system message went into the first user turn


_worker: dict = {}


def _set_worker_tokenizer(tokenizer, settings: RenderSettings) -> None:
    # Rendering merges a system message only under a template that has no system role (and data.system_message auto).
    _worker.update(tokenizer=tokenizer, settings=settings, merges_system=not has_system_role(tokenizer))


def _render_task(task: records.Shard | list[Record]) -> RenderedChunk:
    """A JSONL shard read and rendered, or a chunk of records rendered. Without the cyclic garbage collector, which
    would otherwise walk every object of the process again and again while a task makes millions of small ones
    (a third of the time); what they leave is freed by reference counting, or at the next collection after it."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _render(task)
    finally:
        if collecting:
            gc.enable()


def _render(task: records.Shard | list[Record]) -> RenderedChunk:
    settings: RenderSettings = _worker["settings"]
    invalid = Counter()
    if isinstance(task, records.Shard):
        task = records.read_shard(task, True, invalid if settings.on_invalid == "skip" else None, settings.format)
    kept, truncated, dropped, merged = [], 0, Counter(), 0
    differs = Counter()
    results = training_samples_batch([(record.messages, record.tools) for record in task], _worker["tokenizer"],
                                     settings.train_on, settings.max_length, settings.system_message,
                                     settings.split_special_tokens)
    for record, samples in zip(task, results):
        if isinstance(samples, TemplateError):
            if settings.on_invalid == "error":
                raise DataError(f"{record.location}: {samples}") from None
            dropped[str(samples)] += 1
            continue
        differs[samples[0].differs] += 1
        merged += _worker["merges_system"] and record.messages[0]["role"] == "system"
        truncated += any(sample.truncated for sample in samples)
        labelled = [(sample, len(sample.labels) - sample.labels.count(IGNORE_INDEX)) for sample in samples]
        trained = [(sample, count) for sample, count in labelled if count]
        kept.extend(trained)
        if not trained:
            dropped["with no supervised token left after truncation"] += 1
    lengths = np.array([len(sample.input_ids) for sample, _ in kept], np.int64)
    # Nothing precedes a sample's first label to predict it: never counted.
    supervised = np.array([count - (sample.labels[0] != IGNORE_INDEX) for sample, count in kept], np.int32)
    flat = lambda field: np.fromiter(chain.from_iterable(getattr(s, field) for s, _ in kept), np.int32, int(lengths.sum()))  # noqa: E731
    return RenderedChunk(flat("input_ids"), flat("labels"), lengths, supervised, len(task), invalid, truncated, dropped,
                         differs["history"], differs["boundary"], merged)
