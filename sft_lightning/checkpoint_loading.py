"""A trained module back from its checkpoint: one function, used by ``export`` and ``chat --ckpt_path``.

Resume and ``validate/test/predict --ckpt_path`` load through Lightning's own ``ckpt_path`` (the strategy reads
its shards, the trainer its loop and optimizer state); this module serves the commands that need the weights
without a trainer, whatever strategy wrote them.
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import torch

from sft_lightning.module import SFTLitModule

FSDP_METADATA = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards of a checkpoint


def load_trained_module(ckpt_path: str | Path) -> SFTLitModule:
    """Rebuild the module a Lightning checkpoint was saved from; weights come from the checkpoint only.

    A checkpoint is a file (DDP, single device, FSDP with a full state dict) or a folder: FSDP's sharded
    checkpoint (``meta.pt`` beside torch.distributed.checkpoint shards) or DeepSpeed's ZeRO checkpoint; both are
    consolidated here, in one process, into full weights.
    """
    hyper_parameters, state_dict = read_checkpoint(Path(ckpt_path))
    arguments = module_arguments(hyper_parameters)
    if arguments.get("quantization") is None:
        module = SFTLitModule(**arguments)
        module.build(pretrained=False)
        module.load_state_dict(state_dict)
        return module
    # QLoRA: the checkpoint's base is 4/8-bit. Rebuild the base at full precision from its folder and take only
    # the adapters from the checkpoint, so they merge into real weights (and this runs without a GPU).
    module = SFTLitModule(**{**arguments, "quantization": None})
    module.build(pretrained=True)
    adapters = {name: tensor for name, tensor in state_dict.items() if ".lora_" in name}
    unexpected = module.load_state_dict(adapters, strict=False).unexpected_keys
    if not adapters or unexpected:
        raise ValueError(f"{ckpt_path}: QLoRA checkpoint adapters do not match the model ({len(unexpected)} unknown)")
    return module


def module_arguments(hyper_parameters: dict) -> dict:
    """The saved hyperparameters that ``SFTLitModule`` still takes: LightningCLI adds bookkeeping keys
    (``_instantiator``), and a checkpoint from an earlier version may hold an argument since removed
    (``do_sample``, before ``temperature`` 0 meant greedy)."""
    accepted = inspect.signature(SFTLitModule).parameters
    return {name: value for name, value in hyper_parameters.items() if name in accepted}


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
