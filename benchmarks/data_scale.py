"""Data preparation at scale: sft-lightning against plain ``datasets.map(apply_chat_template)`` and TRL, whole process.

    python benchmarks/data_scale.py [--conversations 100000 1000000] [--trl_python PY]

For each size, N generated chat conversations (the long-tailed ones of ``benchmarks/throughput.py``, JSONL) with the
shipped tiny ChatML tokenizer, each run in a fresh process, one after another:

- ``sft-lightning data prepare`` into an empty cache (render, mask and tokenise every conversation: what ``fit``
  does before its first step), then again from the warm cache (what a second ``fit`` or another rank pays);
- plain ``datasets``: ``load_dataset("json")`` and ``map(apply_chat_template(tokenize=True))`` on every CPU, no
  masking: the floor any trainer built on ``datasets`` starts from;
- TRL's ``SFTTrainer`` built on the same file (``assistant_only_loss``, ``dataset_num_proc`` every CPU): its
  tokenisation happens in the constructor, which is what is timed (skipped with a line where ``--trl_python``
  cannot import trl).

Wall time and peak resident memory (``wait4``) are the process's; ratios are against the runs of this invocation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import ROOT, TOKENIZER, write_conversations  # noqa: E402
from whole_process import measure, trl_available  # noqa: E402

MAX_LENGTH = 1024


def config_file(folder: Path, data: str) -> Path:
    """A fit config for the tiny tokenizer's model and ``data``, its cache in ``folder``."""
    path = folder / "config.yaml"
    path.write_text(
        f"model:\n  model_name_or_path: {TOKENIZER}\n"
        f"data:\n  train_path: {data}\n  max_length: {MAX_LENGTH}\n  cache_dir: {folder / 'cache'}\n"
    )
    return path


def datasets_run(data: str) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    rows = load_dataset("json", data_files=data, split="train")
    rows.map(lambda row: {"input_ids": tokenizer.apply_chat_template(row["messages"], tokenize=True)},
             num_proc=os.cpu_count(), remove_columns=rows.column_names)


def trl_run(data: str, out: str) -> None:
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=out, max_length=MAX_LENGTH, assistant_only_loss=True, report_to="none",
                       dataset_num_proc=os.cpu_count(), use_cpu=True)
    SFTTrainer(model=str(TOKENIZER), args=config, train_dataset=load_dataset("json", data_files=data, split="train"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl_python", default=sys.executable, help="a Python that can import trl and datasets")
    parser.add_argument("--child", choices=["datasets", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "datasets":
        return datasets_run(args.data)
    if args.child == "trl":
        return trl_run(args.data, args.out)
    with_trl = trl_available(args.trl_python)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    print(f"{os.cpu_count()} CPU cores; max_length {MAX_LENGTH}; the shipped tiny ChatML tokenizer"
          + ("" if with_trl else f"; TRL skipped: {args.trl_python} cannot import trl and datasets"))
    me = [sys.executable, __file__]
    for count in args.conversations:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            data = write_conversations(folder / "train.jsonl", count, MAX_LENGTH, args.seed)
            size = Path(data).stat().st_size / 2**20
            print(f"\n{count:,} conversations ({size:.0f} MB of JSONL)", flush=True)
            prepare = [sys.executable, "-m", "sft_lightning.cli", "data", "prepare", "--config", str(config_file(folder, data))]
            runs = {
                "sft-lightning data prepare, empty cache": prepare,
                "sft-lightning data prepare, warm cache": prepare,
                "datasets.map(apply_chat_template)": me + ["--child", "datasets", "--data", data],
                "TRL SFTTrainer constructor": [args.trl_python, __file__, "--child", "trl", "--data", data,
                                               "--out", str(folder / "trl")],
            }
            results = {}
            for label, command in runs.items():
                if label.startswith("TRL") and not with_trl:
                    continue
                results[label] = measure(command, ROOT, env)[:2]
                print(f"  {label}: {results[label][0]:.1f} s, {results[label][1]:.2f} GB", flush=True)
        reference = next(iter(results))
        print(f"{'run':<42}{'wall s':>9}{'peak GB':>9}{'conv/s':>10}{'wall vs ours':>14}")
        for label, (seconds, peak) in results.items():
            print(f"{label:<42}{seconds:>9.1f}{peak:>9.2f}{count / seconds:>10,.0f}{seconds / results[reference][0]:>13.2f}x")


if __name__ == "__main__":
    main()
