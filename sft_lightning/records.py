"""Read chat conversations from JSON, JSONL, Parquet or a ``datasets`` folder and validate them.

Every problem is a :class:`DataError` whose message is one line naming the file, the 1-based line (JSONL),
record (JSON array) or row (Parquet, ``datasets``) and what is wrong, so a bad row costs the user seconds.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

from sft_lightning.errors import DataError
from sft_lightning.formats import Format, to_chatml
from sft_lightning.sources import is_table, require_source

# What a reader does with an invalid conversation: stop with its file and line, or leave it out and count it.
OnInvalid = Literal["error", "skip"]

ROLES = ("system", "user", "assistant", "tool")
# A JSONL file is read (and prepared) in shards of about this many bytes, each on its own.
SHARD_BYTES = 1 << 20
# Fields kept besides role and content, by role: what chat templates render.
EXTRA_FIELDS = {"assistant": ("tool_calls", "reasoning_content"), "tool": ("name", "tool_call_id")}


@dataclass(frozen=True)
class Record:
    """One conversation and where it came from (``file: line N`` or ``file: record N``)."""

    location: str
    messages: list[dict[str, Any]]
    tools: Optional[list[dict]] = None  # function schemas the conversation may call, rendered by the template


def read_records(
    path: str | Path, require_assistant: bool = True, skipped: Optional[Counter] = None, format: Format = "auto"
) -> list[Record]:
    """Read and validate every conversation in ``path``.

    Args:
        path: a JSON array of objects or a JSONL file, each object holding ``messages`` (or, per ``format``, a
            ShareGPT or Alpaca row, converted by :mod:`sft_lightning.formats`); or the same rows in a Parquet
            file or a ``datasets`` ``save_to_disk`` folder.
        require_assistant: training data needs an assistant turn; prediction inputs may end with the user.
        skipped: None: the first invalid conversation raises. A Counter: invalid conversations (and unparsable
            JSONL lines) are left out and counted in it by reason. A file that cannot be read at all still raises.
    """
    path = require_source(str(path))
    shards = jsonl_shards(path)
    if shards is None:
        records = validated(whole_file_rows(path, skipped), require_assistant, skipped, format)
    else:
        records = [record for shard in shards for record in read_shard(shard, require_assistant, skipped, format)]
    if not records:
        left_out = f" ({sum(skipped.values())} invalid ones skipped)" if skipped else ""
        raise DataError(f"{path}: the file holds no conversation{left_out}")
    return records


def whole_file_rows(path: Path, skipped: Optional[Counter] = None) -> list[tuple[str, Any]]:
    """The rows, with their locations, of a file read whole: a JSON array, a Parquet file, a ``datasets`` folder (a
    JSONL file too, though :func:`jsonl_shards` reads one in parts)."""
    return _table_rows(path) if is_table(path) else _parse_rows(path, _text(path), skipped)


def validated(rows, require_assistant: bool = True, skipped: Optional[Counter] = None, format: Format = "auto") -> list[Record]:
    """The rows (location, object) that are valid conversations, as records; see :func:`read_records`."""
    records = []
    for location, row in rows:
        try:
            row = to_chatml(row, format, location)
            records.append(Record(location, validate_messages(row, location, require_assistant), validate_tools(row, location)))
        except DataError as err:
            if skipped is None:
                raise
            skipped[skip_reason(err, location)] += 1
    return records


class Shard(NamedTuple):
    """Whole lines of a JSONL file, read on their own (by a preparation worker, say)."""

    path: Path
    start: int  # byte offsets
    end: int
    first_line: int  # the 1-based number of its first line


def jsonl_shards(path: Path, shard_bytes: Optional[int] = None) -> Optional[list[Shard]]:
    """A JSONL file cut into shards of about ``shard_bytes`` (``SHARD_BYTES``) at line ends; None for a JSON array or a
    table."""
    shard_bytes = shard_bytes or SHARD_BYTES
    if is_table(path):
        return None
    shards, start, line = [], 0, 1
    try:
        with open(path, "rb") as data:
            first = b""
            while not first and (block := data.read(1 << 16)):
                first = block.lstrip().removeprefix(BOM).lstrip()[:1]
            if not first:
                raise DataError(f"{path}: the file is empty")
            if first == b"[":
                return None
            data.seek(0)
            while block := data.read(shard_bytes):
                block += data.readline()  # to the end of the line
                shards.append(Shard(path, start, start + len(block), line))
                start, line = start + len(block), line + block.count(b"\n")
    except OSError as err:
        raise DataError(f"{path}: cannot read the file: {err.strerror or err}") from None
    return shards


def read_shard(shard: Shard, require_assistant: bool = True, skipped: Optional[Counter] = None,
               format: Format = "auto") -> list[Record]:
    """The valid conversations of a shard's lines (see :func:`read_records`), located by line in the whole file."""
    with open(shard.path, "rb") as data:
        data.seek(shard.start)
        raw = data.read(shard.end - shard.start)
    try:
        text = raw.decode("utf-8-sig" if shard.start == 0 else "utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(shard.path, shard.first_line + raw[: err.start].count(b"\n"), err) from None
    return validated(_json_lines(shard.path, text, skipped, shard.first_line), require_assistant, skipped, format)


# What Windows editors (Notepad) write in front of UTF-8 text: read as UTF-8, not refused.
BOM = b"\xef\xbb\xbf"


def _not_utf8(path, line: int, err: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: line {line}: not valid UTF-8 ({err.reason}): save the file as UTF-8 (it may be in "
                     "another encoding, such as GBK, Shift-JIS or Latin-1)")


def _text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, path.read_bytes()[: err.start].count(b"\n") + 1, err) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def _table_rows(path: Path) -> list[tuple[str, Any]]:
    """The rows of a Parquet file or a ``save_to_disk`` folder as Python objects, located by 1-based row."""
    try:
        import datasets
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: reading Parquet files and datasets folders needs the datasets package: "
                        "pip install 'sft-lightning[datasets]'") from None
    try:
        table = datasets.load_from_disk(str(path)).data.table if path.is_dir() else pyarrow.parquet.read_table(path)
    except (OSError, ValueError, TypeError, KeyError) as err:  # pyarrow's errors derive from these; KeyError: state.json
        raise DataError(f"{path}: not readable as {'a datasets folder' if path.is_dir() else 'Parquet'} "
                        f"({' '.join(str(err).split())})") from None
    return [(f"{path}: row {n}", _without_nulls(row)) for n, row in enumerate(table.to_pylist(), start=1)]


def _without_nulls(value: Any) -> Any:
    """A table row as its JSON line would read: Arrow gives every row every key any row has (a column, a struct
    field: another tool's parameters, another call's arguments), null where the row had none. Parquet cannot tell
    such a null from a written one, so null keys are dropped at every depth."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def skip_reason(err: Exception, location: str) -> str:
    """What was wrong, without where or the offending value, so that like problems count together:
    ``unknown role (expected ...)`` from ``f.jsonl: line 3: message 2: unknown role 'bot' (expected ...)``."""
    reason = re.sub(r"^message \d+: ", "", str(err).removeprefix(f"{location}: "))
    return re.sub(r" '[^']*'", "", reason)


def _parse_rows(path: Path, text: str, skipped: Optional[Counter] = None) -> list[tuple[str, Any]]:
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
        return [(f"{path}: record {n}", row) for n, row in enumerate(rows, start=1)]
    return _json_lines(path, text, skipped)


def _json_lines(path: Path, text: str, skipped: Optional[Counter] = None, first_line: int = 1) -> list[tuple[str, Any]]:
    # Lines end at "\n" only: JSON strings may hold other line separators (U+2028) unescaped.
    parsed = []
    for n, line in enumerate(text.split("\n"), start=first_line):
        if not line.strip():
            continue
        try:
            parsed.append((f"{path}: line {n}", json.loads(line)))
        except json.JSONDecodeError as err:
            if skipped is None:
                raise DataError(f"{path}: line {n}: not valid JSON ({err.msg} at column {err.colno})") from None
            skipped["not valid JSON"] += 1
    return parsed


def validate_tools(row: Any, location: str) -> Optional[list[dict]]:
    """The row's ``tools`` (a list of function schemas), None when it has none, or a :class:`DataError`."""
    tools = row.get("tools") if isinstance(row, dict) else None
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise DataError(f"{location}: 'tools' must be a list of function schemas (objects)")
    return tools or None


def validate_messages(row: Any, location: str, require_assistant: bool = True) -> list[dict[str, Any]]:
    """Return the row's messages as ``{"role", "content"}`` dicts (with ``tool_calls`` and ``reasoning_content``
    of assistant messages, ``name`` and ``tool_call_id`` of tool results), or raise a :class:`DataError`."""
    if not isinstance(row, dict):
        raise DataError(f"{location}: expected an object with 'messages', got {type(row).__name__}")
    if "messages" not in row:
        raise DataError(f"{location}: no 'messages' key (keys: {', '.join(map(str, row)) or 'none'})")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{location}: 'messages' must be a non-empty list")
    clean = []
    for n, message in enumerate(messages, start=1):
        where = f"{location}: message {n}"
        if not isinstance(message, dict):
            raise DataError(f"{where}: expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        calls = _tool_calls(message, where) if role == "assistant" else None
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            kind = "missing" if content is None else f"a {type(content).__name__}, not a string"
            raise DataError(f"{where}: content is {kind}")
        if role != "system" and not content.strip() and not calls:
            raise DataError(f"{where}: {role} content is empty")
        extra = {key: message[key] for key in EXTRA_FIELDS.get(role, ()) if message.get(key) is not None}
        if not isinstance(extra.get("reasoning_content", ""), str):
            raise DataError(f"{where}: reasoning_content must be a string")
        clean.append({"role": role, "content": content, **extra})
    _check_order(clean, location)
    if require_assistant and not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{location}: no assistant turn to train on")
    return clean


def _tool_calls(message: dict, where: str) -> Optional[list]:
    calls = message.get("tool_calls")
    if calls is None:
        return None
    named = lambda call: isinstance(call, dict) and isinstance((call.get("function") or {}).get("name"), str)  # noqa: E731
    if not isinstance(calls, list) or not calls or not all(map(named, calls)):
        raise DataError(f"{where}: tool_calls must be a non-empty list of {{\"function\": {{\"name\": ..., \"arguments\": ...}}}}")
    return calls


def _check_order(messages: list[dict[str, Any]], location: str) -> None:
    # Most chat templates (Llama, Mistral, Gemma) require this shape; checking here gives a clear line
    # instead of a template exception deep in the data pipeline.
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for n, message in enumerate(turns, start=len(messages) - len(turns) + 1):
        if message["role"] == "system":
            raise DataError(f"{location}: message {n}: a system message may only come first")
    if turns and turns[0]["role"] != "user":
        raise DataError(f"{location}: the conversation must start with a user turn (after an optional system)")
    offset = len(messages) - len(turns) + 1
    for n in range(1, len(turns)):
        role, before = turns[n]["role"], turns[n - 1]
        if role == "tool" and not (before["role"] == "tool" or before.get("tool_calls")):
            raise DataError(f"{location}: message {n + offset}: a tool result must follow an assistant turn with tool_calls")
        if before["role"] == "tool" and role == "user":
            raise DataError(f"{location}: message {n + offset}: tool results must be answered by an assistant turn")
        if role == before["role"] != "tool":
            raise DataError(f"{location}: message {n + offset}: two {role} turns in a row")
