"""Peak memory and step time of the LM head + loss at a real vocabulary size, against a plain PyTorch loop.

    python benchmarks/lm_head_memory.py [--vocab_size 151936] [--rows 8] [--length 1024] [--steps 3]

Builds a random Qwen2 with Qwen2.5's vocabulary (hidden 128, 2 layers, tied embeddings: almost all of its
parameters are the vocabulary) as a Hugging Face folder, then runs the same training steps (every position
supervised, fp32, AdamW) in three fresh processes, one at a time:

- ``plain``: ``model(input_ids, labels=labels).loss.backward()``, the plain transformers/PyTorch loop;
- ``unchunked``: sft-lightning's step with ``model.lm_head_chunk_tokens: null`` (whole logits);
- ``chunked``: sft-lightning's default (``model.lm_head_chunk_tokens: 512``).

Each process reports its peak resident memory (the whole process) and its mean step time; the table gives each
against the plain loop of the same run. On a GPU it reports the CUDA peak instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_fixture(folder: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-qwen2").save_pretrained(folder)


def run_mode(mode: str, folder: str, rows: int, length: int, steps: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    input_ids = torch.randint(0, vocab, (rows, length), device=device)
    if mode == "plain":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
        step = lambda: model(input_ids=input_ids, labels=input_ids, use_cache=False).loss  # noqa: E731
    else:
        from sft_lightning.module import SFTLitModule

        module = SFTLitModule(folder, **({"lm_head_chunk_tokens": None} if mode == "unchunked" else {}))
        module.configure_model()
        model = module.model.to(device)
        from sft_lightning.collate import collate_training

        batch = collate_training(input_ids.tolist(), input_ids.tolist(), pad_token_id=0).to(device)

        def step():
            stats = module.score(batch)
            return stats.nll_sum / stats.supervised_tokens

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"mode": mode, "peak_gb": peak_gb, "step_s": sum(times[1:]) / max(len(times) - 1, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab_size", type=int, default=151936)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # a child process: one mode, one JSON line
        print(json.dumps(run_mode(args.mode, args.folder, args.rows, args.length, args.steps)))
        return
    folder = Path(tempfile.mkdtemp(prefix="lm-head-"))
    try:
        build_fixture(folder, args.vocab_size)
        results = []
        for mode in ("plain", "unchunked", "chunked"):
            command = [sys.executable, __file__, "--mode", mode, "--folder", str(folder), "--rows", str(args.rows),
                       "--length", str(args.length), "--steps", str(args.steps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    plain = results[0]
    print(f"vocabulary {args.vocab_size}, {args.rows} x {args.length} tokens a step, all supervised, fp32, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'}")
    print(f"{'run':<12} {'peak GB':>8} {'vs plain':>9} {'s/step':>8} {'vs plain':>9}")
    for result in results:
        print(f"{result['mode']:<12} {result['peak_gb']:>8.2f} {result['peak_gb'] / plain['peak_gb']:>8.2f}x "
              f"{result['step_s']:>8.2f} {result['step_s'] / plain['step_s']:>8.2f}x")


if __name__ == "__main__":
    main()
