"""Where a split's conversations come from: one path, or a list of sources mixed by weight.

A source is a path (a JSON/JSONL or Parquet file, a glob of them, or a folder written by ``datasets``'
``save_to_disk``), or ``{path, weight | conversations, format}``. Values stay plain strings and dicts, so they
travel through the CLI, YAML, ``hparams.yaml`` and checkpoints as they were written.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional, TypedDict, Union

from typing_extensions import NotRequired

from sft_lightning.errors import DataError
from sft_lightning.formats import Format

# What marks a folder written by datasets' save_to_disk (one split: Dataset, not DatasetDict).
DATASET_FOLDER_FILES = ("state.json", "dataset_info.json")
GLOB_CHARACTERS = "*?["


class DataSource(TypedDict):
    """One source of a mixture.

    Args:
        path: a JSON/JSONL or Parquet file, a glob of them, or a folder written by ``datasets``' ``save_to_disk``.
        weight: the source's share of each epoch's samples among the weighted sources (which together keep the size
            they have): a share above the source's own size repeats samples, one below it subsamples; drawn once
            from ``data.seed``.
        conversations: instead of a weight, exactly this many samples per epoch (a sample is a conversation, or
            one turn of it under a template that rewrites earlier turns).
        format: row shape of this source (``auto``, ``chatml``, ``sharegpt``, ``alpaca``); default ``data.format``.
        name: what per-source metrics are logged under (``val_loss/<name>``); default the file or folder name
            without its extension (numbered where two sources would share one).
    """

    path: str
    weight: NotRequired[float]
    conversations: NotRequired[int]
    format: NotRequired[Format]
    name: NotRequired[str]


Sources = Union[str, list[Union[str, DataSource]]]


class Source(NamedTuple):
    """A source as the data module uses it: its files resolved, its share given by weight or count (or neither:
    every sample once)."""

    path: str  # as written
    files: tuple[Path, ...]
    format: Format
    weight: Optional[float] = None
    conversations: Optional[int] = None
    name: str = ""


def resolve_sources(value: Sources, option: str, default_format: Format) -> list[Source]:
    """The sources of ``data.<option>``, each with its files, or a one-line :class:`DataError`."""
    items = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    if not items:
        raise DataError(f"data.{option}: an empty list of sources")
    sources = [_source(item, option, default_format) for item in items]
    names = [source.name for source in sources]
    # Two sources may share a file name (train/a.json, extra/a.json): later ones are numbered.
    for i, name in enumerate(names):
        if name in names[:i]:
            names[i] = next(f"{name}_{n}" for n in range(2, len(names) + 2) if f"{name}_{n}" not in names)
    sources = [source._replace(name=name) for source, name in zip(sources, names)]
    weighted = [s for s in sources if s.weight is not None]
    if len(weighted) == 1 and len(sources) > 1:
        raise DataError(f"data.{option}: {weighted[0].path}: a weight shares the epoch among the weighted sources and "
                        "this is the only one, so it would change nothing: weight the others too, or give conversations")
    return sources


def _source(item: Union[str, os.PathLike, DataSource], option: str, default_format: Format) -> Source:
    source = {"path": os.fspath(item)} if isinstance(item, (str, os.PathLike)) else item
    unknown = set(source) - set(DataSource.__annotations__) if isinstance(source, dict) else None
    if unknown is None or unknown or not isinstance(source.get("path"), (str, os.PathLike)):
        raise DataError(f"data.{option}: {item!r} is not a source (a path, or a path with one of weight and "
                        "conversations and an optional format)")
    path = os.fspath(source["path"])
    if path.lstrip().startswith(("[", "{")):
        # The CLI keeps a value it cannot read as sources as a string (a misspelt key, say).
        raise DataError(f"data.{option}: {path!r} is not a list of sources (each a path, or a path with one of "
                        "weight and conversations and an optional format)")
    weight, count = source.get("weight"), source.get("conversations")
    if weight is not None and count is not None:
        raise DataError(f"data.{option}: {path}: give a weight or a number of conversations, not both")
    if (weight is not None and not 0 < weight < math.inf) or (count is not None and count < 1):
        raise DataError(f"data.{option}: {path}: weight and conversations must be positive (and finite)")
    name = source.get("name") or default_name(path)
    return Source(path, source_files(path), source.get("format", default_format), weight, count, name)


def default_name(path: str) -> str:
    """A source's name from its path: the last part without its extension, glob characters dropped
    (``data/code-*.jsonl``: ``code-``; a ``save_to_disk`` folder: the folder's name)."""
    last = Path(path.rstrip("/\\"))
    stem = last.stem if last.suffix in (".json", ".jsonl", ".parquet") else last.name
    return "".join(char for char in stem if char not in GLOB_CHARACTERS + "]") or "source"


def source_files(path: str) -> tuple[Path, ...]:
    """The files a source path names: itself (even when its name holds ``[`` or ``*``), or its glob's matches in
    sorted order (one-line error if none)."""
    if Path(path).exists() or not any(char in path for char in GLOB_CHARACTERS):
        return (require_source(path),)
    matches = sorted(Path(match) for match in glob.glob(path, recursive=True))
    if not matches:
        raise DataError(f"{path}: matches no file")
    return tuple(require_source(str(match)) for match in matches)


def require_source(path: str) -> Path:
    """``path`` as a Path when it is a data file or a ``save_to_disk`` folder; else the one-line error every
    reader of data gives."""
    found = Path(path)
    if found.is_file():
        return found
    if not found.is_dir():
        raise DataError(f"{path}: no such file")
    if (found / "dataset_dict.json").is_file():
        splits = sorted(child.name for child in found.iterdir() if (child / "state.json").is_file())
        raise DataError(f"{path}: a DatasetDict folder; name one of its splits ({', '.join(splits) or 'none'}), "
                        f"e.g. {found / (splits[0] if splits else 'train')}")
    missing = [name for name in DATASET_FOLDER_FILES if not (found / name).is_file()]
    if missing:
        raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk (no {' or '.join(missing)})")
    return found


def is_table(path: Path) -> bool:
    """Read through ``datasets``/pyarrow rather than as JSON text: a Parquet file or a ``save_to_disk`` folder."""
    return path.is_dir() or path.suffix == ".parquet"
