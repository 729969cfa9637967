"""Data tools, as a Python API and as ``sft-lightning data sample | convert | check``.

    from sft_lightning.data import create_chatml_sample, save_chatml_data
    save_chatml_data([create_chatml_sample("Be brief.", "Hi!", "Hello!")], "my.jsonl")
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from sft_lightning.errors import DataError
from sft_lightning.formats import Format
from sft_lightning.records import read_records, validate_messages

COUNTRIES = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa", "Norway": "Oslo",
    "Poland": "Warsaw", "Greece": "Athens", "Chile": "Santiago", "Cuba": "Havana", "Ireland": "Dublin",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "early": "late",
    "happy": "sad", "open": "closed", "full": "empty", "old": "new", "strong": "weak", "wet": "dry",
}
WORDS = ["apple", "river", "cloud", "stone", "tiger", "lemon", "piano", "robot", "candle", "garden", "planet", "window"]
SYSTEMS = ["You are a helpful assistant.", "Answer in one short sentence."]


def example_conversation(rng: random.Random) -> dict:
    """One short synthetic conversation (arithmetic, capitals, opposites, spelling, small talk)."""
    kind = rng.choice(["add", "capital", "opposite", "reverse", "chat"])
    if kind == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        turns = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")]
    elif kind == "capital":
        country = rng.choice(sorted(COUNTRIES))
        turns = [(f"What is the capital of {country}?", f"The capital of {country} is {COUNTRIES[country]}.")]
    elif kind == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        turns = [(f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}.")]
    elif kind == "reverse":
        word = rng.choice(WORDS)
        turns = [(f"Spell {word} backwards.", f"{word} backwards is {word[::-1]}.")]
    else:
        country = rng.choice(sorted(COUNTRIES))
        turns = [
            ("Hello!", "Hello! How can I help you today?"),
            (f"Where is {COUNTRIES[country]}?", f"{COUNTRIES[country]} is the capital of {country}."),
        ]
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.4 else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}



def create_chatml_sample(system: Optional[str], user: str, assistant: str) -> dict:
    """One single-turn conversation in ChatML ``messages`` form (no system message when ``system`` is empty)."""
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def save_chatml_data(samples: Iterable[dict], path: str | Path) -> Path:
    """Validate ``samples`` and write them: JSONL for a ``.jsonl`` path, else a JSON array.

    Written beside the target and renamed, so a failure never leaves half a file; an invalid sample raises a
    DataError naming it (``sample N``) and writes nothing.
    """
    path = Path(path)
    rows = [{"messages": validate_messages(row, f"sample {n}")} for n, row in enumerate(samples, start=1)]
    if not rows:
        raise DataError(f"{path}: no samples to save")
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) if path.suffix == ".jsonl" else (
        json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


def example_conversations(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [example_conversation(rng) for _ in range(count)]


def sample(output_path: str, count: int = 20, seed: int = 0) -> None:
    """Write example ChatML conversations to start from.

    Args:
        output_path: ``.jsonl`` (one conversation per line) or ``.json`` (an array).
        count: how many conversations.
        seed: seed of the generator.
    """
    print(f"wrote {count} conversations to {save_chatml_data(example_conversations(count, seed), output_path)}")


def convert(input_path: str, output_path: str, from_format: Format = "auto", on_invalid: str = "error") -> None:
    """Convert ShareGPT or Alpaca data (JSON array or JSONL) to ChatML ``messages``.

    Args:
        input_path: the file to convert.
        output_path: ``.jsonl`` or ``.json`` file to write.
        from_format: ``sharegpt``, ``alpaca``, or ``auto`` (by each row's keys); ``--from`` for short.
        on_invalid: ``error`` stops at the first bad row with its line; ``skip`` leaves bad rows out.
    """
    skipped = Counter() if on_invalid == "skip" else None
    records = read_records(input_path, skipped=skipped, fmt=from_format)
    save_chatml_data(({"messages": r.messages, **({"tools": r.tools} if r.tools else {})} for r in records), output_path)
    left_out = f", skipped {sum(skipped.values())} ({', '.join(f'{n} {why}' for why, n in skipped.items())})" if skipped else ""
    print(f"converted {len(records)} conversations from {input_path} to {output_path}{left_out}")
