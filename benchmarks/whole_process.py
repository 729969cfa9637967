"""Whole-process wall time and peak memory at a small and at a real vocabulary: sft-lightning, TRL and a plain loop.

    python benchmarks/whole_process.py [--fixtures small qwen2.5 llama3] [--conversations 450] [--trl_python PY]

For each fixture (the long-tailed conversations of ``benchmarks/throughput.py`` and a randomly initialised Qwen2
saved as a Hugging Face folder with the shipped ChatML tokenizer), one after another, each in a fresh process:

- ``sft-lightning fit``, padded and packed: the real command (imports, tokenisation, one epoch, checkpoint,
  export to ``hf_model/``), and packed twice more: with ``--model.lm_head_chunk_tokens=null`` (whole logits) and
  with ``--model.lm_head_chunk_above_mb=0`` (the LM head in chunks even where the logits are small);
- a plain loop, padded and packed: what a user writes by hand (load, HF forward with labels, AdamW, save);
- the packed run with validation on held-out conversations, without and with generation on them while training
  (``eval.*`` at its defaults): what evaluation while training costs;
- TRL's ``SFTTrainer`` (padded, no packing, then ``save_model``), run by ``--trl_python`` (default: this Python;
  skipped with a line when it cannot import trl).

Every run trains one epoch, batch 8 (conversations padded, rows packed), ``max_length`` 1024, AdamW at one
constant learning rate, fp32 on the CPU (or bf16-mixed on the first GPU). Wall time is the process's; peak
memory is its peak resident set (``wait4``), or the CUDA peak on a GPU. Ratios are against the runs of this
invocation, never against numbers from elsewhere.

Fixtures: ``small`` (vocabulary 674, hidden 256, 4 layers, 3.3M parameters), ``qwen2.5`` (Qwen2.5's 151,936-token
vocabulary, hidden 128, 2 layers, tied: 19.8M parameters, almost all of them the vocabulary), ``llama3`` (Llama
3's 128,256 tokens, hidden 128, 2 layers, untied head).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import LEARNING_RATE, ROOT, write_conversations  # noqa: E402

FIXTURES = {
    "small": dict(vocab_size=674, hidden_size=256, intermediate_size=768, num_hidden_layers=4, tie_word_embeddings=True),
    "qwen2.5": dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=True),
    "llama3": dict(vocab_size=128256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=False),
}
BATCH_SIZE = 8
MAX_LENGTH = 1024
VAL_CONVERSATIONS = 60  # held out, for the runs that measure what evaluation while training costs


def write_fixture(folder: Path, name: str, conversations: int, seed: int) -> tuple[str, str, str]:
    import torch
    from transformers import Qwen2Config
    from transformers.utils import logging

    logging.disable_progress_bar()  # the table is the output

    from throughput import write_model

    config = Qwen2Config(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH, **FIXTURES[name])
    folder.mkdir(parents=True)
    data = write_conversations(folder / "train.jsonl", conversations, MAX_LENGTH, seed)
    held_out = write_conversations(folder / "val.jsonl", VAL_CONVERSATIONS, MAX_LENGTH, seed + 1)
    with torch.random.fork_rng():
        return data, held_out, write_model(folder / "model", config, seed)


def measure(command: list[str], cwd: Path, env: dict) -> tuple[float, float, str]:
    """Run ``command`` to the end; (wall seconds, peak RSS in GB, its output). Raises with the output if it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{output[-3000:]}")
    peak = usage.ru_maxrss / 2**20  # KiB on Linux
    for line in output.splitlines():  # a GPU run prints its CUDA peak, which replaces the host figure
        if line.startswith("cuda_peak_gb="):
            peak = float(line.split("=")[1])
    return seconds, peak, output


def sft_lightning_command(data: str, model: str, out: Path, packed: bool, cuda: bool) -> list[str]:
    return [
        str(Path(sys.executable).with_name("sft-lightning")), "fit", "--seed_everything=0",
        f"--model.model_name_or_path={model}", "--model.attn_implementation=sdpa_varlen",
        f"--model.learning_rate={LEARNING_RATE}", "--model.warmup_ratio=0", "--model.lr_scheduler=constant",
        f"--data.train_path={data}", f"--data.max_length={MAX_LENGTH}", f"--data.batch_size={BATCH_SIZE}",
        f"--data.packing={str(packed).lower()}", f"--data.cache_dir={out / 'cache'}",
        f"--trainer.accelerator={'gpu' if cuda else 'cpu'}", "--trainer.devices=1", "--trainer.max_epochs=1",
        f"--trainer.precision={'bf16-mixed' if cuda else '32-true'}", f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false",
    ]


def plain_run(data: str, model_path: str, out: str, packed: bool) -> None:
    """The plain loop as a whole process: tokenise (with sft-lightning's masking), train one epoch, save."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft_lightning.render import load_tokenizer
    from sft_lightning.tokenized import tokenize_split
    from throughput import plain_batches

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer = load_tokenizer(model_path)
    samples = tokenize_split(data, tokenizer, MAX_LENGTH, "assistant").samples()
    batches = plain_batches(samples, tokenizer.pad_token_id, BATCH_SIZE, MAX_LENGTH, packed)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    for batch in batches:
        inputs = {k: getattr(batch, k).to(device) for k in ("input_ids", "attention_mask", "position_ids", "labels") if hasattr(batch, k)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**inputs, use_cache=False).loss  # use_cache=False: packed rows stay apart
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(out)
    if cuda:
        print(f"cuda_peak_gb={torch.cuda.max_memory_allocated() / 2**30}")


def trl_run(data: str, model_path: str, out: str) -> None:
    """TRL's SFTTrainer as its documentation shows it, on the same conversations: padded, no packing."""
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=out, per_device_train_batch_size=BATCH_SIZE, num_train_epochs=1, max_length=MAX_LENGTH,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, bf16=cuda, use_cpu=not cuda,
        save_strategy="no", report_to="none", logging_steps=10, seed=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model_path, args=config, train_dataset=load_dataset("json", data_files=data, split="train"))
    trainer.train()
    trainer.save_model(out)
    if cuda:
        print(f"cuda_peak_gb={torch.cuda.max_memory_allocated() / 2**30}")


def trl_available(python: str) -> bool:
    return subprocess.run([python, "-c", "import trl, datasets"], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", nargs="+", choices=sorted(FIXTURES), default=["small", "qwen2.5"])
    parser.add_argument("--conversations", type=int, default=450)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl_python", default=sys.executable, help="a Python that can import trl and datasets")
    parser.add_argument("--runs", nargs="+", default=["sft-lightning", "plain", "eval", "TRL"],
                        help="which runs, by the start of their label; ratios are against TRL, else the first run")
    parser.add_argument("--child", choices=["plain-padded", "plain-packed", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "trl":
        return trl_run(args.data, args.model, args.out)
    if args.child:
        return plain_run(args.data, args.model, args.out, packed=args.child == "plain-packed")

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed, imported by transformers, warns about it
    with_trl = trl_available(args.trl_python)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"{args.conversations} conversations, batch {BATCH_SIZE}, max_length {MAX_LENGTH}, one epoch, "
          f"{'bf16-mixed on ' + torch.cuda.get_device_name() if cuda else f'fp32 on {os.cpu_count()} CPU cores'}"
          + ("" if with_trl else f"; TRL skipped: {args.trl_python} cannot import trl and datasets"))
    me = [sys.executable, __file__]
    for name in args.fixtures:
        shape = FIXTURES[name]
        print(f"\nfixture {name}: vocabulary {shape['vocab_size']:,}, hidden {shape['hidden_size']}, "
              f"{shape['num_hidden_layers']} layers, {'tied' if shape['tie_word_embeddings'] else 'untied'} head", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / name
            data, held_out, model = write_fixture(folder, name, args.conversations, args.seed)
            child = ["--data", data, "--model", model]
            runs = {
                "sft-lightning padded": sft_lightning_command(data, model, folder / "padded", False, cuda),
                "sft-lightning packed": sft_lightning_command(data, model, folder / "packed", True, cuda),
                # The LM head and loss on whole logits, as before they ran in chunks (model.lm_head_chunk_tokens), and
                # in chunks whatever the logits' size (by default only above model.lm_head_chunk_above_mb).
                "sft-lightning packed, whole logits": sft_lightning_command(data, model, folder / "whole", True, cuda)
                + ["--model.lm_head_chunk_tokens=null"],
                "sft-lightning packed, always chunks": sft_lightning_command(data, model, folder / "chunks", True, cuda)
                + ["--model.lm_head_chunk_above_mb=0"],
                # Validation loss on held-out conversations in both; generation on them (eval.*, at its defaults) in one.
                "eval cost: packed + validation": sft_lightning_command(data, model, folder / "val", True, cuda)
                + [f"--data.val_path={held_out}", "--eval.num_prompts=0"],
                "eval cost: ... + generation eval": sft_lightning_command(data, model, folder / "eval", True, cuda)
                + [f"--data.val_path={held_out}"],
                "plain loop padded": me + ["--child", "plain-padded", "--out", str(folder / "plain-padded")] + child,
                "plain loop packed": me + ["--child", "plain-packed", "--out", str(folder / "plain-packed")] + child,
                "TRL SFTTrainer padded": [args.trl_python, __file__, "--child", "trl", "--out", str(folder / "trl")] + child,
            }
            chosen = [label for label in runs if any(label.startswith(prefix) for prefix in args.runs)]
            chosen = [label for label in chosen if with_trl or not label.startswith("TRL")]
            results = {}
            for label in chosen:
                results[label] = measure(runs[label], ROOT, env)[:2]
                print(f"  {label}: {results[label][0]:.1f} s, {results[label][1]:.2f} GB", flush=True)
        without, with_eval = results.get("eval cost: packed + validation"), results.get("eval cost: ... + generation eval")
        if without and with_eval:
            print(f"generation eval at its defaults: {with_eval[0] - without[0]:+.1f} s = "
                  f"{(with_eval[0] - without[0]) / without[0]:+.1%} of the run's wall time")
        reference = chosen[-1] if chosen[-1].startswith("TRL") else chosen[0]
        name = reference.split()[0]
        print(f"{'run':<36}{'wall s':>9}{'peak GB':>9}{'wall vs ' + name:>14}{'peak vs ' + name:>14}")
        for label, (seconds, peak) in results.items():
            ref_seconds, ref_peak = results[reference]
            print(f"{label:<36}{seconds:>9.1f}{peak:>9.2f}{seconds / ref_seconds:>13.2f}x{peak / ref_peak:>13.2f}x")


if __name__ == "__main__":
    main()
