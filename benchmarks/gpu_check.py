"""A short, prepared device check: a preset's architecture (random weights, no download) trained for a few packed
steps through ``sft-lightning fit``, reporting tokens/s, MFU and peak memory against the memory planner.

    python benchmarks/gpu_check.py                                   # Qwen2.5-0.5B architecture, bf16-mixed, 50 steps
    python benchmarks/gpu_check.py --arch meta-llama/Meta-Llama-3-8B-Instruct --strategy fsdp --steps 10 --num_layers 8
    python benchmarks/gpu_check.py --arch meta-llama/Meta-Llama-3-8B-Instruct --strategy fsdp --devices 8  # all 32 layers
    for attn in sdpa_varlen flash_attention_2 sdpa; do python benchmarks/gpu_check.py --attn $attn --steps 20; done
    python benchmarks/gpu_check.py --lm_head_chunk_tokens 0    # the LM head and loss on whole logits, to compare

The architecture's config comes from ``configs/models/`` (``--num_layers`` shortens it to fit one GPU); the
tokenizer is the shipped tiny ChatML one (its ids lie within any vocabulary); the data is the long-tailed fixture
of ``benchmarks/throughput.py``. On a machine without CUDA it runs the same path on the CPU at ``32-true`` with
a 2-layer model, which is how it is tested.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import write_conversations, write_model  # noqa: E402

from sft_lightning.cli import cli_main  # noqa: E402
from sft_lightning.memory import GB, SHARDINGS, format_plan, model_config, plan_memory  # noqa: E402


def fsdp_strategy(config) -> list[str]:
    """The FSDP presets' strategy (FSDP2, each decoder layer sharded, activation checkpointing) for this architecture."""
    layer = {"qwen2": "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
             "llama": "transformers.models.llama.modeling_llama.LlamaDecoderLayer"}[config.model_type]
    return ["--trainer.strategy=sft_lightning.sharding.FSDP2Strategy", f"--trainer.strategy.layer_classes=[{layer}]",
            "--model.gradient_checkpointing=true"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="Qwen/Qwen2.5-0.5B-Instruct", help="a model of configs/models/")
    parser.add_argument("--strategy", choices=["auto", "fsdp"], default="auto")
    parser.add_argument("--devices", type=int, default=1, help="GPUs (FSDP shards over them; 1 runs its code unsharded)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=4, help="packed rows per step")
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--num_layers", type=int, default=None, help="keep only this many decoder layers")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--attn", default="sdpa_varlen", help="model.attn_implementation (sdpa_varlen: one varlen "
                        "kernel call per layer on a GPU; flash_attention_2 needs flash-attn; sdpa: dense block mask)")
    parser.add_argument("--lm_head_chunk_tokens", type=int, default=512, help="0: whole logits")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    config = model_config(args.arch)
    layers = args.num_layers or (None if cuda else 2)
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):  # derived from the layer count when the config was made
            config.layer_types = config.layer_types[:layers]
    max_length = args.max_length if cuda else 256
    # With several devices Lightning starts this script again for each other rank (LOCAL_RANK set, the environment
    # inherited): those ranks use the folder and fixture that rank 0 wrote before it launched them.
    out = Path(args.out or os.environ.setdefault("GPU_CHECK_OUT", tempfile.mkdtemp(prefix="gpu_check-")))
    data, model = out / "train.jsonl", out / "model"
    launched_rank = "LOCAL_RANK" in os.environ  # before fit, which sets it in rank 0's environment too
    if not launched_rank:
        out.mkdir(parents=True, exist_ok=True)
        write_conversations(data, 20 * args.steps * args.batch_size, max_length, seed=0)
        write_model(model, config, seed=0)
    precision = "bf16-mixed" if cuda else "32-true"
    cli_main([
        "fit", "--config", "configs/tiny.yaml", f"--model.model_name_or_path={model}", f"--data.train_path={data}",
        "--data.val_path=null", "--data.packing=true", f"--data.max_length={max_length}",
        f"--data.batch_size={args.batch_size}", f"--data.cache_dir={out / 'cache'}", f"--trainer.max_steps={args.steps}",
        "--trainer.accelerator=auto", f"--trainer.devices={args.devices}", f"--trainer.precision={precision}",
        f"--trainer.default_root_dir={out}", "--trainer.log_every_n_steps=10", "--model.warmup_ratio=0.1",
        "--model.learning_rate=1e-4", "--trainer.enable_progress_bar=false", f"--model.attn_implementation={args.attn}",
        f"--model.lm_head_chunk_tokens={args.lm_head_chunk_tokens or 'null'}",
        *(fsdp_strategy(config) if args.strategy == "fsdp" else []),
    ])
    if launched_rank:
        return  # rank 0 reports
    run = max((out / "lightning_logs").glob("version_*"), key=lambda path: path.stat().st_mtime)
    events = EventAccumulator(str(run))
    events.Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{args.arch} ({config.num_hidden_layers} layers), {device}, {precision}, {args.strategy}, {args.attn}, "
          f"lm_head_chunk_tokens {args.lm_head_chunk_tokens or 'off'}, "
          f"{args.batch_size} x {max_length} packed tokens per step, {args.steps} steps")
    for tag in ("throughput/tokens_per_s", "throughput/supervised_tokens_per_s", "throughput/mfu",
                "throughput/padding_fraction", "memory/peak_gb", "memory/peak_reserved_gb", "train_loss"):
        if tag in last:
            print(f"  {tag:38s} {last[tag]:.4g}")
    plan = plan_memory(config, args.devices, SHARDINGS["zero3" if args.strategy == "fsdp" else "ddp"], precision, 4.0,
                       args.batch_size * max_length, checkpointing=args.strategy == "fsdp")
    print(format_plan(plan, args.arch, precision, 80.0))
    for tag in ("memory/peak_gb", "memory/peak_reserved_gb"):
        if tag in last:
            print(f"measured {tag.split('/')[1]} / planned total: {last[tag] * GB / plan.total:.2f}")


if __name__ == "__main__":
    main()
