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
from typing import Literal, NamedTuple, Optional

from sft_lightning.errors import DataError
from sft_lightning.formats import Format
from sft_lightning.records import OnInvalid, read_records, validate_messages

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
# The same tasks in Chinese (the seed trainer's users write Chinese data).
COUNTRIES_ZH = {"法国": "巴黎", "意大利": "罗马", "西班牙": "马德里", "德国": "柏林", "日本": "东京", "埃及": "开罗",
                "秘鲁": "利马", "肯尼亚": "内罗毕", "加拿大": "渥太华", "挪威": "奥斯陆", "波兰": "华沙", "希腊": "雅典"}
OPPOSITES_ZH = {"大": "小", "快": "慢", "上": "下", "冷": "热", "早": "晚", "新": "旧", "强": "弱", "长": "短", "高": "矮"}
SYSTEMS_ZH = ["你是一个有用的AI助手。", "请用一句话回答。"]


class ExampleTasks(NamedTuple):
    """A language's synthetic tasks: word lists and the (user, assistant) phrasing of each task."""

    countries: dict[str, str]
    opposites: dict[str, str]
    words: list[str]  # spelled backwards; empty: no such task
    systems: list[str]
    add: tuple[str, str]
    capital: tuple[str, str]
    opposite: tuple[str, str]
    reverse: tuple[str, str]
    chat: tuple[tuple[str, str], ...]


TASKS = {
    "en": ExampleTasks(
        COUNTRIES, OPPOSITES, WORDS, SYSTEMS,
        add=("What is {a} plus {b}?", "{a} plus {b} is {total}."),
        capital=("What is the capital of {country}?", "The capital of {country} is {capital}."),
        opposite=("What is the opposite of {word}?", "The opposite of {word} is {opposite}."),
        reverse=("Spell {word} backwards.", "{word} backwards is {reversed}."),
        chat=(("Hello!", "Hello! How can I help you today?"), ("Where is {capital}?", "{capital} is the capital of {country}.")),
    ),
    "zh": ExampleTasks(
        COUNTRIES_ZH, OPPOSITES_ZH, [], SYSTEMS_ZH,
        add=("{a}加{b}等于几？", "{a}加{b}等于{total}。"),
        capital=("{country}的首都是哪里？", "{country}的首都是{capital}。"),
        opposite=("“{word}”的反义词是什么？", "“{word}”的反义词是“{opposite}”。"),
        reverse=("", ""),
        chat=(("你好！", "你好！有什么可以帮你的吗？"), ("{capital}在哪里？", "{capital}是{country}的首都。")),
    ),
}


def example_conversation(rng: random.Random, language: Literal["en", "zh"] = "en") -> dict:
    """One short synthetic conversation (arithmetic, capitals, opposites, spelling, small talk)."""
    tasks = TASKS[language]
    kind = rng.choice(["add", "capital", "opposite", *(["reverse"] if tasks.words else []), "chat"])
    if kind == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        values = {"a": a, "b": b, "total": a + b}
    elif kind == "opposite":
        word = rng.choice(sorted(tasks.opposites))
        values = {"word": word, "opposite": tasks.opposites[word]}
    elif kind == "reverse":
        word = rng.choice(tasks.words)
        values = {"word": word, "reversed": word[::-1]}
    else:  # capital, chat
        country = rng.choice(sorted(tasks.countries))
        values = {"country": country, "capital": tasks.countries[country]}
    messages = [{"role": "system", "content": rng.choice(tasks.systems)}] if rng.random() < 0.4 else []
    for user, assistant in tasks.chat if kind == "chat" else [getattr(tasks, kind)]:
        messages += [{"role": "user", "content": user.format(**values)},
                     {"role": "assistant", "content": assistant.format(**values)}]
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


def example_conversations(count: int, seed: int = 0, language: Literal["en", "zh"] = "en") -> list[dict]:
    rng = random.Random(seed)
    return [example_conversation(rng, language) for _ in range(count)]


def sample(output_path: str, count: int = 20, seed: int = 0, language: Literal["en", "zh"] = "en") -> None:
    """Write example ChatML conversations to start from.

    Args:
        output_path: ``.jsonl`` (one conversation per line) or ``.json`` (an array).
        count: how many conversations.
        seed: seed of the generator.
        language: ``en`` or ``zh`` (Chinese).
    """
    written = save_chatml_data(example_conversations(count, seed, language), output_path)
    print(f"wrote {count} conversations to {written}")


def convert(input_path: str, output_path: str, format: Format = "auto", on_invalid: OnInvalid = "error") -> None:
    """Convert ShareGPT or Alpaca data (JSON array or JSONL) to ChatML ``messages``.

    Args:
        input_path: the file to convert.
        output_path: ``.jsonl`` or ``.json`` file to write.
        format: ``sharegpt``, ``alpaca``, or ``auto`` (by each row's keys); ``--from`` reads better.
        on_invalid: ``error`` stops at the first bad row with its line; ``skip`` leaves bad rows out.
    """
    skipped = Counter() if on_invalid == "skip" else None
    records = read_records(input_path, skipped=skipped, format=format)
    save_chatml_data(({"messages": r.messages, **({"tools": r.tools} if r.tools else {})} for r in records), output_path)
    left_out = f", skipped {sum(skipped.values())} ({', '.join(f'{n} {why}' for why, n in skipped.items())})" if skipped else ""
    print(f"converted {len(records)} conversations from {input_path} to {output_path}{left_out}")
