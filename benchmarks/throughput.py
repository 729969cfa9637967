"""Training throughput: a plain PyTorch loop against sft-lightning, each padded and packed, in one process run.

    python benchmarks/throughput.py [--conversations 450] [--max_length 1024] [--batch_size 8]

Builds its own fixture: long-tailed chat conversations (log-normal lengths, a few near ``max_length``) and a
randomly initialised ~3M-parameter Qwen2 saved as a Hugging Face folder, so sft-lightning loads it through
``from_pretrained`` as it would a real model. All four runs train one epoch on the same tokenised samples
(rendered and masked once, by sft-lightning) with AdamW at the same learning rate, fp32 on the CPU (or the
first GPU). Tokens/s counts real (non-padding) tokens per second of training loop, so padding waste shows up
as a lower rate; the ratios are against the plain loops measured here, never against numbers from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Timer
from transformers import AutoModelForCausalLM, Qwen2Config

from sft_lightning.collate import collate_training
from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.module import SFTLitModule
from sft_lightning.packing import collate_packed, pack_best_fit_decreasing
from sft_lightning.render import load_tokenizer
from sft_lightning.tokenized import tokenize_split
from sft_lightning.layout import ConnectRunLayout

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "models" / "tiny-qwen2"
WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this from".split()
LEARNING_RATE = 1e-3


def write_fixture(folder: Path, conversations: int, max_length: int, seed: int) -> tuple[str, str]:
    """Long-tailed conversations (JSONL) and a random ~3M-parameter Qwen2; returns (data path, model path)."""
    config = Qwen2Config(
        vocab_size=674, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_length, tie_word_embeddings=True,
    )
    return write_conversations(folder / "train.jsonl", conversations, max_length, seed), write_model(folder / "model", config, seed)


def write_conversations(path: Path, conversations: int, max_length: int, seed: int) -> str:
    """Long-tailed chat conversations as JSONL: log-normal lengths, a few past ``max_length`` words."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for _ in range(conversations):
            # Words per conversation: log-normal (median ~60), capped so a few run past max_length and truncate.
            words = min(int(rng.lognormvariate(4.1, 0.9)) + 8, max_length)
            turns = rng.choice([1, 1, 2, 3])
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
            for _ in range(turns):
                share = max(words // (2 * turns), 1)
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=share))})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=share))})
            out.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def write_model(folder: Path, config, seed: int) -> str:
    """A randomly initialised model of ``config`` with the shipped ChatML tokenizer, as a Hugging Face folder."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER / name, folder / name)
    return str(folder)


def plain_loop(model_path: str, batches: list[dict], device: torch.device) -> float:
    """What a user writes by hand: HF forward with labels, backward, AdamW step. Returns seconds."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    _synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        inputs = {k: getattr(batch, k).to(device) for k in ("input_ids", "attention_mask", "position_ids", "labels") if hasattr(batch, k)}
        # use_cache=False: with transformers' default cache, packed samples silently attend to each other.
        model(**inputs, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return time.perf_counter() - start


def plain_batches(samples, pad_token_id: int, batch_size: int, max_length: int, packed: bool) -> list[dict]:
    order = list(range(len(samples)))
    random.Random(0).shuffle(order)
    if packed:
        rows = pack_best_fit_decreasing([len(samples[i].input_ids) for i in order], max_length)
        groups = [[[order[i] for i in row] for row in rows[b : b + batch_size]] for b in range(0, len(rows), batch_size)]
        return [
            collate_packed([[(samples[i].input_ids, samples[i].labels) for i in row] for row in group], pad_token_id)
            for group in groups
        ]
    groups = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    return [
        collate_training([samples[i].input_ids for i in group], [samples[i].labels for i in group], pad_token_id)
        for group in groups
    ]


def lightning_run(model_path: str, data_path: str, batch_size: int, max_length: int, packed: bool, cache: str) -> float:
    """sft-lightning's module and data module under a Lightning Trainer, one epoch; seconds of the train loop."""
    seed_everything(0, verbose=False)
    timer = Timer()
    module = SFTLitModule(model_path, learning_rate=LEARNING_RATE, warmup_ratio=0.0, lr_scheduler="constant")
    data = ChatMLDataModule(
        train_path=data_path, tokenizer_path=model_path, max_length=max_length, batch_size=batch_size,
        packing=packed, cache_dir=cache, seed=0,
    )
    trainer = Trainer(
        accelerator="auto", devices=1, precision="32-true", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ConnectRunLayout(module, data), timer],
    )
    trainer.fit(module, data)
    return timer.time_elapsed("train")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=450)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=8, help="conversations (padded) or rows (packed) per step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data_path, model_path = write_fixture(Path(tmp), args.conversations, args.max_length, args.seed)
        tokenizer = load_tokenizer(model_path)
        samples = tokenize_split(data_path, tokenizer, args.max_length, "assistant").samples()
        tokens = sum(len(s.input_ids) for s in samples)
        lengths = sorted(len(s.input_ids) for s in samples)
        print(
            f"fixture: {len(samples)} conversations, {tokens} tokens, length median {lengths[len(lengths) // 2]}, "
            f"max {lengths[-1]}; model {sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_path).parameters()) / 1e6:.1f}M "
            f"parameters; batch {args.batch_size}, max_length {args.max_length}; device {device}, "
            f"{torch.get_num_threads()} threads"
        )
        seconds = {}
        for packed in (False, True):
            batches = plain_batches(samples, tokenizer.pad_token_id, args.batch_size, args.max_length, packed)
            seconds["plain", packed] = plain_loop(model_path, batches, device)
            seconds["sft-lightning", packed] = lightning_run(
                model_path, data_path, args.batch_size, args.max_length, packed, str(Path(tmp) / "cache")
            )
    print(f"\n{'run':<28}{'seconds':>9}{'tokens/s':>11}{'vs plain padded':>17}{'vs plain packed':>17}")
    for (name, packed), secs in seconds.items():
        label = f"{name} {'packed' if packed else 'padded'}"
        print(
            f"{label:<28}{secs:>9.1f}{tokens / secs:>11.0f}{seconds['plain', False] / secs:>16.2f}x"
            f"{seconds['plain', True] / secs:>16.2f}x"
        )
    print(f"\nsft-lightning packed vs its own padded run: {seconds['sft-lightning', False] / seconds['sft-lightning', True]:.2f}x")


if __name__ == "__main__":
    main()
