"""Write a trained model as a Hugging Face folder that plain transformers can load and chat with."""

from __future__ import annotations

import shutil
from pathlib import Path

from sft_lightning.adapters import has_adapters
from sft_lightning.checkpoint_loading import load_trained_module
from sft_lightning.module import DType
from sft_lightning.render import stop_token_ids

SHARD_SIZE = "5GB"


def save_hf_folder(model, tokenizer, output_dir: str | Path, adapter_only: bool = False) -> Path:
    """Save safetensors weights, the tokenizer with its chat template, and a generation config that stops at
    the end-of-turn token. Written to a temporary folder first, so a failure never leaves a half export.

    LoRA adapters are merged into the base weights (a plain transformers folder), or with ``adapter_only``
    saved alone (peft's ``adapter_config.json`` + ``adapter_model.safetensors``, to load over the base).
    """
    output_dir = Path(output_dir)
    if has_adapters(model) and not adapter_only:
        model = model.merge_and_unload()
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    stops = stop_token_ids(tokenizer)
    model.config.use_cache = True  # gradient checkpointing turns it off for training
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Shards of at most 5 GB: each is serialised in memory as it is written, so this bounds what the export holds
    # beside the weights.
    model.save_pretrained(staging, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return output_dir


def export(ckpt_path: str, output_dir: str, dtype: DType = "auto", adapter_only: bool = False) -> None:
    """Export a training checkpoint as a Hugging Face model folder.

    Args:
        ckpt_path: a ``.ckpt`` file or sharded checkpoint folder written by ``sft-lightning fit``.
        output_dir: folder to write (replaced if it exists).
        dtype: the weights' dtype in the folder: ``auto`` is the pretrained model's own (its config.json, e.g.
            bfloat16 for Qwen2.5 and Llama 3; as trained where it names none); ``float32`` keeps float32 master weights.
        adapter_only: for a LoRA run, save the adapters alone instead of merging them into the base weights.
    """
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint")
    module = load_trained_module(ckpt_path, dtype)
    print(f"exported {ckpt_path} to {save_hf_folder(module.model, module.tokenizer, output_dir, adapter_only)}")
