"""Other dataset shapes to ChatML ``messages``: ShareGPT and Alpaca. Pure functions on one row.

- ChatML: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.
- ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...], "system"?: ...}``; also
  ``function_call`` turns (a JSON call, or list of calls, ``{"name", "arguments"}``: an assistant turn with
  ``tool_calls``), ``observation`` turns (a ``tool`` result) and top-level ``tools`` (a list, or its JSON text).
- Alpaca: ``{"instruction": ..., "input"?: ..., "output": ..., "system"?: ...}``; the user turn is the instruction,
  followed by a blank line and the input when there is one.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from sft_lightning.errors import DataError

Format = Literal["auto", "chatml", "sharegpt", "alpaca"]
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "chatml"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def to_chatml(row: Any, format: Format, location: str) -> Any:
    """``row`` as a ChatML row (other keys dropped), or unchanged when it is ChatML or not an object.

    Validation of roles and content happens afterwards, on the messages, for every format alike.
    """
    kind = detect_format(row) if format == "auto" else format
    if kind == "sharegpt":
        tools = _sharegpt_tools(row.get("tools"), location) if isinstance(row, dict) else None
        return {"messages": _from_sharegpt(row, location), **({"tools": tools} if tools else {})}
    if kind == "alpaca":
        return {"messages": _from_alpaca(row, location)}
    if format == "auto" and isinstance(row, dict) and kind is None:
        keys = ", ".join(map(str, row)) or "none"
        raise DataError(
            f"{location}: no 'messages' key (keys: {keys}); nor ShareGPT 'conversations' or Alpaca 'instruction'/'output'"
        )
    return row


def _from_sharegpt(row: Any, location: str) -> list[dict]:
    turns = row.get("conversations") if isinstance(row, dict) else None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{location}: 'conversations' must be a non-empty list (ShareGPT)")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for n, turn in enumerate(turns, start=1):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _sharegpt_calls(turn.get("value"), location, n)})
        elif speaker == "observation":
            messages.append({"role": "tool", "content": turn.get("value")})
        elif speaker in SHAREGPT_ROLES:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
        else:
            raise DataError(
                f"{location}: turn {n}: unknown ShareGPT speaker {speaker!r} (expected system, human, gpt, function_call, observation)"
            )
    return messages


def _json(value: Any, location: str, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f"{location}: {what} is not valid JSON ({err.msg})") from None


def _sharegpt_calls(value: Any, location: str, n: int) -> list[dict]:
    calls = _json(value, location, f"turn {n}: the function_call")
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(call, dict) and isinstance(call.get("name"), str) for call in calls):
        raise DataError(f"{location}: turn {n}: a function_call needs a 'name' (and 'arguments')")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]


def _sharegpt_tools(value: Any, location: str) -> list[dict] | None:
    tools = _json(value, location, "'tools'") if value else None
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise DataError(f"{location}: 'tools' must be a list of function schemas")
    # ShareGPT files list bare schemas; chat templates expect {"type": "function", "function": schema}.
    # Anything but a schema object is left as it is, for the record's validation to name.
    return [{"type": "function", "function": tool} if isinstance(tool, dict) and "function" not in tool else tool
            for tool in tools]


def _from_alpaca(row: Any, location: str) -> list[dict]:
    if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
        raise DataError(f"{location}: an Alpaca row needs 'instruction' and 'output'")
    user = row["instruction"]
    if isinstance(user, str) and isinstance(row.get("input"), str) and row["input"].strip():
        user = f"{user}\n\n{row['input']}"
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
