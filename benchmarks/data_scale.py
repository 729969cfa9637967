"""Data at scale, whole process: time to the first optimizer step with sft-lightning and with TRL, and preparation
alone against plain ``datasets.map(apply_chat_template)``, on the same generated file, in one run.

    python benchmarks/data_scale.py [--conversations 200000 1000000] [--trl_python PY] [--skip_trl_above N]

For each size, N generated chat conversations (the long-tailed ones of ``benchmarks/throughput.py``, JSONL) and the
``small`` model of ``benchmarks/whole_process.py`` (3.3M parameters, the shipped ChatML tokenizer) with Qwen2.5's
chat template (TRL trains assistant turns only under templates it knows, Qwen2.5's among them), each run in a fresh
process, one after another:

- ``sft-lightning fit --trainer.max_steps 1`` into an empty cache (read, render, mask and tokenise every
  conversation, plan, load the model, one step, checkpoint, export), then again from the warm cache;
- ``sft-lightning data prepare`` into an empty cache: preparation alone, as on a CPU machine ahead of the job;
- TRL's ``SFTTrainer`` on the same file (``assistant_only_loss``, ``dataset_num_proc`` every CPU, no packing,
  ``max_steps`` 1, its ``datasets`` cache emptied): constructor (its tokenisation) and ``train()``;
- plain ``datasets``: ``load_dataset("json")`` and ``map(apply_chat_template(tokenize=True))`` on every CPU, no
  masking: the floor any trainer built on ``datasets`` starts from.

Wall time and peak resident memory (``wait4``) are the process's; ratios are against TRL's run of this invocation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import ROOT, write_conversations  # noqa: E402
from whole_process import measure, trl_available, write_fixture  # noqa: E402

MAX_LENGTH = 1024
TEMPLATE = ROOT / "tests" / "templates" / "Qwen--Qwen2.5-3B-Instruct.jinja"


def config_file(folder: Path, data: str, model: str) -> Path:
    """A fit config for ``model`` and ``data``, its cache and runs in ``folder``."""
    path = folder / "config.yaml"
    path.write_text(
        f"trainer:\n  accelerator: cpu\n  devices: 1\n  precision: 32-true\n  enable_progress_bar: false\n"
        f"  default_root_dir: {folder / 'runs'}\n"
        f"model:\n  model_name_or_path: {model}\n"
        f"data:\n  train_path: {data}\n  max_length: {MAX_LENGTH}\n  cache_dir: {folder / 'cache'}\n"
    )
    return path


def datasets_run(data: str, model: str) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = load_dataset("json", data_files=data, split="train")
    rows.map(lambda row: {"input_ids": tokenizer.apply_chat_template(row["messages"], tokenize=True)},
             num_proc=os.cpu_count(), remove_columns=rows.column_names)


def trl_run(data: str, model: str, out: str) -> None:
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=out, max_length=MAX_LENGTH, assistant_only_loss=True, report_to="none",
                       dataset_num_proc=os.cpu_count(), use_cpu=True, max_steps=1, save_strategy="no",
                       disable_tqdm=True)
    SFTTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=data, split="train")).train()


def model_folder(folder: Path) -> str:
    """The small benchmark model with Qwen2.5's chat template."""
    _, _, model = write_fixture(folder, "small", 2, 0)
    shutil.copy(TEMPLATE, Path(model) / "chat_template.jinja")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl_python", default=sys.executable, help="a Python that can import trl and datasets")
    parser.add_argument("--skip_trl_above", type=int, default=200_000, help="no TRL or datasets runs above this size")
    parser.add_argument("--child", choices=["datasets", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "datasets":
        return datasets_run(args.data, args.model)
    if args.child == "trl":
        return trl_run(args.data, args.model, args.out)
    with_trl = trl_available(args.trl_python)
    print(f"{os.cpu_count()} CPU cores; max_length {MAX_LENGTH}; the small model with Qwen2.5's chat template"
          + ("" if with_trl else f"; TRL skipped: {args.trl_python} cannot import trl and datasets"))
    me = [sys.executable, __file__]
    cli = [sys.executable, "-m", "sft_lightning.cli"]
    for count in args.conversations:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            model = model_folder(folder / "fixture")
            data = write_conversations(folder / "train.jsonl", count, MAX_LENGTH, args.seed)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "HF_DATASETS_CACHE": str(folder / "hf")}
            print(f"\n{count:,} conversations ({Path(data).stat().st_size / 2**20:.0f} MB of JSONL)", flush=True)
            config = str(config_file(folder, data, model))
            fit = cli + ["fit", "--config", config, "--trainer.max_steps", "1"]
            runs = {
                "sft-lightning fit to step 1, empty cache": fit,
                "sft-lightning fit to step 1, warm cache": fit,
                "sft-lightning data prepare, empty cache": cli + ["data", "prepare", "--config", config],
                "TRL SFTTrainer to step 1": [args.trl_python, __file__, "--child", "trl", "--data", data, "--model", model,
                                             "--out", str(folder / "trl")],
                "datasets.map(apply_chat_template)": me + ["--child", "datasets", "--data", data, "--model", model],
            }
            results = {}
            for label, command in runs.items():
                if label.startswith("sft-lightning data prepare"):
                    shutil.rmtree(folder / "cache")
                if (label.startswith("TRL") and not with_trl) or (count > args.skip_trl_above and not label.startswith("sft")):
                    continue
                seconds, peak, output = measure(command, ROOT, env)
                prepared = next((line for line in output.splitlines() if line.startswith("train prepared in")), "")
                results[label] = seconds, peak
                print(f"  {label}: {seconds:.1f} s, {peak:.2f} GB{'; ' + prepared if prepared else ''}", flush=True)
        reference = results.get("TRL SFTTrainer to step 1")
        print(f"{'run':<44}{'wall s':>9}{'peak GB':>9}{'conv/s':>10}{'TRL / run':>11}")
        for label, (seconds, peak) in results.items():
            ratio = f"{reference[0] / seconds:>10.2f}x" if reference else f"{'':>11}"
            print(f"{label:<44}{seconds:>9.1f}{peak:>9.2f}{count / seconds:>10,.0f}{ratio}")


if __name__ == "__main__":
    main()
