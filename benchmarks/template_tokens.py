"""How a chat template changes what a data file costs to train: samples, tokens and supervised tokens.

    python benchmarks/template_tokens.py [--data data/chatml_data.json] [TEMPLATE.jinja ...]

Renders every conversation of ``--data`` with each template (default: the Qwen2.5, Qwen3 and DeepSeek-R1 templates
in tests/templates) through :func:`sft_lightning.render.training_samples`, with the tiny shipped tokenizer, and
prints the tokens trained on beside the tokens of the conversations rendered once (``apply_chat_template``). A
template that rewrites earlier turns (Qwen3 and DeepSeek-R1 drop reasoning from the history) gives one sample per
assistant turn, so a conversation of n turns carries its early turns n times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sft_lightning.render import load_tokenizer, training_samples

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT / "tests" / "templates" / name for name in
           ("Qwen--Qwen2.5-3B-Instruct.jinja", "Qwen--Qwen3-1.7B.jinja", "deepseek-ai--DeepSeek-R1-Distill-Llama-8B.jinja")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("templates", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--data", default=str(ROOT / "data" / "chatml_data.json"))
    args = parser.parse_args()
    conversations = [row["messages"] for row in json.loads(Path(args.data).read_text())]
    tokenizer = load_tokenizer(str(ROOT / "models" / "tiny-qwen2"))
    print(f"{len(conversations)} conversations of {args.data}, {sum(m['role'] == 'assistant' for c in conversations for m in c)} "
          "assistant turns, tokenised with models/tiny-qwen2")
    print(f"{'template':<44} {'samples':>8} {'tokens':>8} {'rendered once':>14} {'ratio':>6} {'supervised':>11}")
    for path in args.templates:
        tokenizer.chat_template = path.read_text()
        samples = [sample for messages in conversations for sample in training_samples(messages, tokenizer)]
        tokens = sum(len(sample.input_ids) for sample in samples)
        once = sum(len(tokenizer.apply_chat_template(messages)["input_ids"]) for messages in conversations)
        supervised = sum(sample.supervised_tokens for sample in samples)
        print(f"{path.stem:<44} {len(samples):>8} {tokens:>8} {once:>14} {tokens / once:>5.2f}x {supervised:>11}")


if __name__ == "__main__":
    main()
