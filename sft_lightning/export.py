"""Write a trained model as a Hugging Face folder that plain transformers can load and chat with."""

from __future__ import annotations

import inspect
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from sft_lightning.adapters import has_adapters
from sft_lightning.module import DType, SFTLitModule
from sft_lightning.render import stop_token_ids

FSDP_METADATA = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards of a checkpoint


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
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return output_dir


def load_checkpoint_module(ckpt_path: str | Path) -> SFTLitModule:
    """Rebuild the module a Lightning checkpoint was saved from; weights come from the checkpoint only.

    A checkpoint is a file (DDP, single device, FSDP with a full state dict) or a folder: FSDP's sharded
    checkpoint (``meta.pt`` beside torch.distributed.checkpoint shards) or DeepSpeed's ZeRO checkpoint; both are
    consolidated here, in one process, into full weights.
    """
    hyper_parameters, state_dict = read_checkpoint(Path(ckpt_path))
    # LightningCLI adds bookkeeping keys such as `_instantiator` to the saved hyperparameters.
    accepted = inspect.signature(SFTLitModule).parameters
    module = SFTLitModule(**{k: v for k, v in hyper_parameters.items() if k in accepted})
    if module.hparams.quantization is None:
        module.configure_model(pretrained=False)
        module.load_state_dict(state_dict)
        return module
    # QLoRA: the checkpoint's base is 4/8-bit. Rebuild the base at full precision from its folder and take only
    # the adapters from the checkpoint, so they merge into real weights (and this runs without a GPU).
    module.hparams.quantization = None
    module.configure_model(pretrained=True)
    adapters = {name: tensor for name, tensor in state_dict.items() if ".lora_" in name}
    unexpected = module.load_state_dict(adapters, strict=False).unexpected_keys
    if not adapters or unexpected:
        raise ValueError(f"{ckpt_path}: QLoRA checkpoint adapters do not match the model ({len(unexpected)} unknown)")
    return module


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(hyper_parameters, the module's full state_dict) of a checkpoint file or sharded folder."""
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return checkpoint["hyper_parameters"], checkpoint["state_dict"]
    if (path / FSDP_METADATA).is_file():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        # FSDP2Strategy writes {"state_dict": ..., "optimizer_0": ...} as shards; read the weights only. torch 2.13
        # has no public reader that skips the optimizer (dcp_to_torch_save converts everything), hence the privates.
        shards: dict = {}
        _load_state_dict(shards, storage_reader=FileSystemReader(path),
                         planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
        meta = torch.load(path / FSDP_METADATA, map_location="cpu", weights_only=True)
        return meta["hyper_parameters"], shards["state_dict"]
    if (path / "checkpoint").is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            # A file written here from the user's own checkpoint; it holds DeepSpeed objects weights_only refuses.
            convert_zero_checkpoint_to_fp32_state_dict(str(path), f"{tmp}/full.ckpt")
            checkpoint = torch.load(f"{tmp}/full.ckpt", map_location="cpu", weights_only=False)
        return checkpoint["hyper_parameters"], checkpoint["state_dict"]
    raise FileNotFoundError(f"{path}: not a checkpoint file, an FSDP sharded checkpoint or a DeepSpeed checkpoint folder")


def export(ckpt_path: str, output_dir: str, dtype: Optional[DType] = None, adapter_only: bool = False) -> None:
    """Export a training checkpoint as a Hugging Face model folder.

    Args:
        ckpt_path: a ``.ckpt`` file written by ``sft-lightning fit``.
        output_dir: folder to write (replaced if it exists).
        dtype: cast the weights before saving (e.g. ``bfloat16`` to halve the size); default: as trained.
        adapter_only: for a LoRA run, save the adapters alone instead of merging them into the base weights.
    """
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint")
    module = load_checkpoint_module(ckpt_path)
    if dtype not in (None, "auto"):
        module.model.to(getattr(torch, dtype))
    print(f"exported {ckpt_path} to {save_hf_folder(module.model, module.tokenizer, output_dir, adapter_only)}")
