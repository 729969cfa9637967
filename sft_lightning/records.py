"""Read chat conversations from JSON or JSONL and validate them.

Every problem is a :class:`DataError` whose message is one line naming the file, the 1-based line (JSONL)
or record (JSON array) and what is wrong, so a bad row costs the user seconds.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sft_lightning.errors import DataError
from sft_lightning.formats import Format, to_chatml

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One conversation and where it came from (``file: line N`` or ``file: record N``)."""

    location: str
    messages: list[dict[str, str]]


def read_records(
    path: str | Path, require_assistant: bool = True, skipped: Optional[Counter] = None, fmt: Format = "auto"
) -> list[Record]:
    """Read and validate every conversation in ``path``.

    Args:
        path: a JSON array of objects or a JSONL file, each object holding ``messages`` (or, per ``fmt``, a
            ShareGPT or Alpaca row, converted by :mod:`sft_lightning.formats`).
        require_assistant: training data needs an assistant turn; prediction inputs may end with the user.
        skipped: None: the first invalid conversation raises. A Counter: invalid conversations (and unparsable
            JSONL lines) are left out and counted in it by reason. A file that cannot be read at all still raises.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 ({err.reason})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    records = []
    for location, row in _parse_rows(path, text, skipped):
        try:
            row = to_chatml(row, fmt, location)
            records.append(Record(location, validate_messages(row, location, require_assistant)))
        except DataError as err:
            if skipped is None:
                raise
            skipped[skip_reason(err, location)] += 1
    if not records:
        left_out = f" ({sum(skipped.values())} invalid ones skipped)" if skipped else ""
        raise DataError(f"{path}: the file holds no conversation{left_out}")
    return records


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
    parsed = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed.append((f"{path}: line {n}", json.loads(line)))
        except json.JSONDecodeError as err:
            if skipped is None:
                raise DataError(f"{path}: line {n}: not valid JSON ({err.msg} at column {err.colno})") from None
            skipped["not valid JSON"] += 1
    return parsed


def validate_messages(row: Any, location: str, require_assistant: bool = True) -> list[dict[str, str]]:
    """Return the row's messages as plain ``{"role", "content"}`` dicts, or raise a :class:`DataError`."""
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
        if not isinstance(content, str):
            kind = "missing" if content is None else f"a {type(content).__name__}, not a string"
            raise DataError(f"{where}: content is {kind}")
        if role != "system" and not content.strip():
            raise DataError(f"{where}: {role} content is empty")
        clean.append({"role": role, "content": content})
    _check_order(clean, location)
    if require_assistant and not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{location}: no assistant turn to train on")
    return clean


def _check_order(messages: list[dict[str, str]], location: str) -> None:
    # Most chat templates (Llama, Mistral, Gemma) require this shape; checking here gives a clear line
    # instead of a template exception deep in the data pipeline.
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for n, message in enumerate(turns, start=len(messages) - len(turns) + 1):
        if message["role"] == "system":
            raise DataError(f"{location}: message {n}: a system message may only come first")
    if turns and turns[0]["role"] != "user":
        raise DataError(f"{location}: the conversation must start with a user turn (after an optional system)")
    for n in range(1, len(turns)):
        if turns[n]["role"] == turns[n - 1]["role"]:
            first = n + len(messages) - len(turns) + 1
            raise DataError(f"{location}: message {first}: two {turns[n]['role']} turns in a row")
