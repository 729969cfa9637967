"""A trained module back from its checkpoint: one function, used by ``export`` and ``chat --ckpt_path``.

Resume and ``validate/test/predict --ckpt_path`` load through Lightning's own ``ckpt_path`` (the strategy reads
its shards, the trainer its loop and optimizer state); this module serves the commands that need the weights
without a trainer, whatever strategy wrote them.

It holds about one copy of the weights in host memory, whatever the model's size: a checkpoint file is memory-mapped,
not read; sharded checkpoints are consolidated into one state dict, each tensor cast to the asked dtype as it comes;
the model is built on the meta device and takes those very tensors (``load_state_dict(assign=True)``). Nothing is
written outside the checkpoint's and the output's folders.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig

from sft_lightning.language_model import init_buffers
from sft_lightning.checkpointing import drop_head_copy
from sft_lightning.module import SFTLitModule

FSDP_METADATA = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards of a checkpoint


def load_trained_module(ckpt_path: str | Path, dtype: Optional[str] = None) -> SFTLitModule:
    """Rebuild the module a Lightning checkpoint was saved from; weights come from the checkpoint only, in ``dtype``
    (a torch dtype's name; ``auto``: the pretrained model's own, from its config; default: as saved).

    A checkpoint is a file (DDP, single device, FSDP with a full state dict) or a folder: FSDP's sharded
    checkpoint (``meta.pt`` beside torch.distributed.checkpoint shards) or DeepSpeed's ZeRO checkpoint; both are
    consolidated here, in one process, into full weights.
    """
    path = Path(ckpt_path)
    hyper_parameters = read_hyper_parameters(path)
    if dtype == "auto":
        dtype = pretrained_dtype(hyper_parameters["model_name_or_path"], hyper_parameters.get("trust_remote_code", False))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    arguments = module_arguments(hyper_parameters)
    if arguments.get("quantization") is None:
        module = SFTLitModule(**arguments)
        module.build(pretrained=False, materialize=False)
        materialize_buffers(module.model)  # before the weights: computing them may reset their module's parameters
        # The meta module's own state dict is the layout to read into: tied weights (one tensor, two names) once.
        state_dict = drop_head_copy(read_state_dict(path, dtype, layout=module.state_dict(keep_vars=True)))
        module.load_state_dict(state_dict, assign=True)
        del state_dict  # the model holds these tensors now, and nothing else does
        module.model.tie_weights()
        return module
    state_dict = drop_head_copy(read_state_dict(path))
    # QLoRA: the checkpoint's base is 4/8-bit. Rebuild the base at full precision from its folder and take only
    # the adapters from the checkpoint, so they merge into real weights (and this runs without a GPU).
    module = SFTLitModule(**{**arguments, "quantization": None})
    module.build(pretrained=True)
    adapters = {name: tensor for name, tensor in state_dict.items() if ".lora_" in name}
    unexpected = module.load_state_dict(adapters, strict=False).unexpected_keys
    if not adapters or unexpected:
        raise ValueError(f"{ckpt_path}: QLoRA checkpoint adapters do not match the model ({len(unexpected)} unknown)")
    if dtype is not None:
        module.model.to(dtype)
    return module


def materialize_buffers(model: torch.nn.Module) -> None:
    """Give the buffers that no state dict holds (left on the meta device by a meta build) host memory and their
    values; before the weights are loaded (see :func:`~sft_lightning.language_model.init_buffers`)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA's wrapper
    non_persistent = {name for name, _ in model.named_non_persistent_buffers()}
    for name, buffer in model.named_buffers():
        if buffer.is_meta and name in non_persistent:
            owner, _, attribute = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attribute, torch.empty_like(buffer, device="cpu"), persistent=False)
    init_buffers(model)


def module_arguments(hyper_parameters: dict) -> dict:
    """The saved hyperparameters that ``SFTLitModule`` still takes: LightningCLI adds bookkeeping keys
    (``_instantiator``), and a checkpoint from an earlier version may hold an argument since removed
    (``do_sample``, before ``temperature`` 0 meant greedy)."""
    accepted = inspect.signature(SFTLitModule).parameters
    return {name: value for name, value in hyper_parameters.items() if name in accepted}


def cast_each(state_dict: dict, dtype: Optional[torch.dtype]) -> dict:
    """``state_dict`` with every floating tensor in ``dtype``, one tensor at a time (each original is released as its
    cast replaces it, so the peak is one copy plus one tensor)."""
    if dtype is None:
        return state_dict
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            state_dict[name] = tensor.to(dtype)
    return state_dict


def pretrained_dtype(model_name_or_path: str, trust_remote_code: bool = False) -> Optional[torch.dtype]:
    """The dtype a model's folder says its weights are in (``dtype`` in config.json), or None where it says none."""
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def read_hyper_parameters(path: Path) -> dict:
    """The module's arguments saved in a checkpoint file or sharded folder (the weights are not read)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]
    if (path / FSDP_METADATA).is_file():
        return torch.load(path / FSDP_METADATA, map_location="cpu", weights_only=True)["hyper_parameters"]
    if (path / "checkpoint").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_model_state_file

        # Lightning's client state is in the model states file, beside 16-bit weights that the memory map leaves
        # unread; it holds DeepSpeed objects that weights_only refuses (the user's own checkpoint).
        stage = 3 if any((path / "checkpoint").glob("zero_pp_rank_*_model_states.pt")) else 2
        return torch.load(get_model_state_file(str(path / "checkpoint"), stage), map_location="cpu", weights_only=False,
                          mmap=True)["hyper_parameters"]
    raise FileNotFoundError(f"{path}: not a checkpoint file, an FSDP sharded checkpoint or a DeepSpeed checkpoint folder")


def read_state_dict(path: Path, dtype: Optional[torch.dtype] = None, layout: Optional[dict] = None) -> dict:
    """The module's full state_dict, in ``dtype``, of a checkpoint file or sharded folder. ``layout``: the module's
    own state dict (meta tensors will do); a sharded checkpoint is then read into one tensor per distinct tensor of it
    (tied weights once), where without it every saved name gets its own."""
    if path.is_file():
        # Memory-mapped: pages are read as they are used, not all at once.
        return cast_each(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"], dtype)
    if (path / FSDP_METADATA).is_file():
        return read_sharded_weights(path, dtype, layout)
    if (path / "checkpoint").is_dir():
        return read_deepspeed_state_dict(path, dtype)
    raise FileNotFoundError(f"{path}: not a checkpoint file, an FSDP sharded checkpoint or a DeepSpeed checkpoint folder")


def read_sharded_weights(path: Path, dtype: Optional[torch.dtype], layout: Optional[dict]) -> dict:
    """The weights of a torch.distributed.checkpoint folder as FSDP2Strategy writes it (``{"state_dict": ...,
    "optimizer_0": ...}``): only ``state_dict`` is read, each tensor straight into a host tensor of ``dtype`` (DCP
    casts as it copies), so the float32 weights never exist whole beside the cast ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    saved = {name.removeprefix("state_dict."): meta for name, meta in reader.read_metadata().state_dict_metadata.items()
             if name.startswith("state_dict.") and isinstance(meta, TensorStorageMetadata)}
    targets, made = {}, {}
    for name in layout if layout is not None else saved:
        if name not in saved:
            continue  # left missing: load_state_dict names it
        meta = saved[name]
        kind = dtype if dtype is not None and meta.properties.dtype.is_floating_point else meta.properties.dtype
        key = id(layout[name]) if layout is not None else name
        targets[name] = made.setdefault(key, torch.empty(meta.size, dtype=kind))
    dcp.load({"state_dict": targets}, storage_reader=reader, no_dist=True)
    return targets


def read_deepspeed_state_dict(path: Path, dtype: Optional[torch.dtype]) -> dict:
    """A ZeRO checkpoint folder of Lightning's DeepSpeedStrategy (tag ``checkpoint``), consolidated in memory:
    DeepSpeed's float32 partitions are merged tensor by tensor (its lazy mode) and each cast as it is made, where
    Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` would write the whole float32 model to a file first."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="checkpoint", lazy_mode=True)
    state_dict, made = {}, {}  # made: one tensor per lazy tensor (tied weights share one), the lazy one kept alive
    for name in list(lazy):
        pending = lazy.pop(name)
        if id(pending) not in made:
            tensor = pending.contiguous()
            made[id(pending)] = pending, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        # Lightning < 2.1 wrapped the module; its checkpoints carry the wrapper's prefix.
        state_dict[name.removeprefix("_forward_module.")] = made[id(pending)][1]
    return state_dict
