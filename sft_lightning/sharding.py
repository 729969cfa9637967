"""FSDP2: every rank holds 1/N of the weights, gradients and AdamW state; a decoder layer is gathered when it runs.

Built on PyTorch's ``fully_shard`` through Lightning's ``ModelParallelStrategy``. The model is built on the meta
device on every rank and sharded before any weight exists; global rank 0 alone reads the pretrained weights (in
host memory) and broadcasts them tensor by tensor into every rank's shards, so no other rank ever holds a full
copy. Under ``bf16-mixed`` the layers compute in bfloat16 from float32 master shards and gradients are reduced in
float32; buffers (the rotary ``inv_freq``) are never cast. Checkpoints are folders of per-rank shards
(``torch.distributed.checkpoint``), written beside their final name and renamed into place.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel

from sft_lightning.errors import ConfigError
from sft_lightning.memory import decoder_layer_names

# Lightning precision -> the dtype FSDP2 gathers parameters in for compute (None: as stored).
PARAM_DTYPES = {"bf16-mixed": torch.bfloat16}


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(
        self,
        layer_classes: Optional[list[str]] = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        """Fully sharded data parallel over every rank of every node (PyTorch FSDP2).

        Args:
            layer_classes: the decoder layer classes, each instance sharded (and gathered) as one unit, by
                qualified name (``transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer``) or class name;
                default: the model's own ``_no_split_modules``.
            reshard_after_forward: free each gathered layer after its forward and gather it again for backward
                (ZeRO-3 memory); False keeps it until backward (less communication, ZeRO-2 memory).
            save_distributed_checkpoint: checkpoints as folders of per-rank shards (``sft-lightning export``
                consolidates them); False gathers a full checkpoint file on rank 0.
            process_group_backend: ``nccl`` on GPUs and ``gloo`` on CPUs by default.
            timeout: how long a collective waits for the other ranks.
        """
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )
        self.layer_classes = layer_classes
        self.reshard_after_forward = reshard_after_forward
        self.save_distributed_checkpoint = save_distributed_checkpoint

    def setup_environment(self) -> None:
        # Lightning 2.6.6 reads the mesh's data-parallel size from this private attribute, where "auto" means the
        # number of nodes (tensor parallelism inside a node). FSDP alone shards over every rank.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_pretrained(
        self, empty: Callable[[], PreTrainedModel], pretrained: Callable[[], PreTrainedModel]
    ) -> PreTrainedModel:
        """The model of ``empty()`` (built here on the meta device) sharded over all ranks and holding the weights of
        ``pretrained()``, which only global rank 0 calls."""
        with torch.device("meta"):
            model = empty()
        self.shard(model)
        model.to_empty(device=self.root_device)
        full = pretrained() if self.global_rank == 0 else None
        # Rank 0 sends each tensor; every rank keeps only its own shard of it.
        set_model_state_dict(
            model, full.state_dict() if full is not None else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
        # Buffers outside the state dict (rotary inv_freq) are computed at construction, which meta skipped.
        buffers = [dict(full.named_non_persistent_buffers()) if full is not None else None]
        dist.broadcast_object_list(buffers, src=0)
        with torch.no_grad():
            for name, value in buffers[0].items():
                model.get_buffer(name).copy_(value)
        return model

    def shard(self, model: PreTrainedModel) -> None:
        """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head)."""
        classes = set(self.layer_classes or decoder_layer_names(model))
        layers = [m for m in model.modules() if {type(m).__name__, f"{type(m).__module__}.{type(m).__name__}"} & classes]
        if not layers:
            raise ConfigError(
                f"FSDP2Strategy.layer_classes {sorted(classes)} match no module of {type(model).__name__} "
                f"(its decoder layers: {sorted(decoder_layer_names(model))})"
            )
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(
            param_dtype=PARAM_DTYPES.get(str(self.precision_plugin.precision)), reduce_dtype=torch.float32
        )
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Every rank writes its shards into a hidden folder beside ``filepath``, which then replaces it: a run
        killed mid-write leaves the previous checkpoint whole."""
        if not self.save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()
        if self.is_global_zero:
            replace_path(partial, path)
        self.barrier()


def replace_path(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing a file, folder or link there (a folder is moved aside first)."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        aside = target.with_name(f".{target.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        target.rename(aside)
        source.rename(target)
        shutil.rmtree(aside)
        return
    source.rename(target)
