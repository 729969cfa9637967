"""Other dataset shapes to ChatML ``messages``: ShareGPT and Alpaca. Pure functions on one row.

- ChatML: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.
- ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...], "system"?: ...}``.
- Alpaca: ``{"instruction": ..., "input"?: ..., "output": ..., "system"?: ...}``; the user turn is the instruction,
  followed by a blank line and the input when there is one.
"""

from __future__ import annotations

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


def to_chatml(row: Any, fmt: Format, location: str) -> Any:
    """``row`` as a ChatML row (other keys dropped), or unchanged when it is ChatML or not an object.

    Validation of roles and content happens afterwards, on the messages, for every format alike.
    """
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind == "sharegpt":
        return {"messages": _from_sharegpt(row, location)}
    if kind == "alpaca":
        return {"messages": _from_alpaca(row, location)}
    if fmt == "auto" and isinstance(row, dict) and kind is None:
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
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"{location}: turn {n}: unknown ShareGPT speaker {speaker!r} (expected system, human, gpt)")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return messages


def _from_alpaca(row: Any, location: str) -> list[dict]:
    if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
        raise DataError(f"{location}: an Alpaca row needs 'instruction' and 'output'")
    user = row["instruction"]
    if isinstance(user, str) and isinstance(row.get("input"), str) and row["input"].strip():
        user = f"{user}\n\n{row['input']}"
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
