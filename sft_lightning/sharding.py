"""FSDP2: every rank holds 1/N of the weights, gradients and AdamW state; a decoder layer is gathered when it runs.

Built on PyTorch's ``fully_shard`` through Lightning's ``ModelParallelStrategy``. The model is built on the meta
device on every rank and sharded before any weight exists; global rank 0 alone reads the pretrained weights (in
host memory) and broadcasts them tensor by tensor into every rank's shards, so no other rank ever holds a full
copy (and nobody reads them when a checkpoint's weights come next). Under ``bf16-mixed`` the layers compute in
bfloat16 from float32 master shards and gradients are reduced in float32; buffers (the rotary ``inv_freq``) are
never cast. Checkpoints are folders of per-rank shards (``torch.distributed.checkpoint``), written beside their final
name and renamed into place.

What Lightning 2.6.6's ``ModelParallelStrategy`` leaves to the user, done here: gradients are reduce-scattered once
per optimizer step, not after every accumulated micro-batch (Lightning's ``block_backward_sync`` knows only DDP's
``no_sync``); evaluation and prediction run under ``no_grad`` rather than ``inference_mode``, whose inference tensors
FSDP2's parameter gathering cannot reuse (Lightning does the same for its FSDP1 strategy only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel

from sft_lightning.checkpointing import save_beside
from sft_lightning.errors import ConfigError
from sft_lightning.memory import decoder_layer_names
from sft_lightning.language_model import init_buffers
from sft_lightning.sequence_parallel import check_sequence_parallel
from sft_lightning.strategy_model import CausalLM, StrategyModel

# Lightning precision -> the dtype FSDP2 gathers parameters in for compute (None: as stored).
PARAM_DTYPES = {"bf16-mixed": torch.bfloat16}


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(
        self,
        layer_classes: Optional[list[str]] = None,
        reshard_after_forward: bool = True,
        reduce_every_micro_batch: bool = False,
        save_distributed_checkpoint: bool = True,
        sequence_parallel_size: int = 1,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        """Fully sharded data parallel over every rank of every node (PyTorch FSDP2).

        Args:
            layer_classes: the decoder layer classes, each instance sharded (and gathered) as one unit, by
                qualified name (``transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer``) or class name;
                default: the model's own ``_no_split_modules``.
            reshard_after_forward: free each gathered decoder layer after its forward and gather it again for
                backward (ZeRO-3 memory); False keeps it until backward (less communication, ZeRO-2 memory). The root
                unit (embeddings, final norm, LM head), which backward needs first, stays gathered either way.
            reduce_every_micro_batch: False: with ``accumulate_grad_batches`` > 1, the micro-batches of an optimizer
                step accumulate their gradients unsharded on each rank and are reduce-scattered once, at the step
                (1/accumulation of the gradient traffic; the accumulated gradient costs 4 bytes per parameter on every
                GPU, which ``sft-lightning estimate`` counts). True: reduce-scatter after every micro-batch (sharded
                accumulation, the memory of no accumulation: for models whose full float32 gradient does not fit).
            save_distributed_checkpoint: checkpoints as folders of per-rank shards (``sft-lightning export``
                consolidates them); False gathers a full checkpoint file on rank 0.
            sequence_parallel_size: split every packed micro-batch along its length over this many consecutive ranks
                (Ulysses: attention exchanges heads for tokens with an all-to-all), so a sample's activations are
                spread over them: for samples too long for one GPU. The ranks of a group take the same micro-batches
                (the data-parallel size is the number of GPUs divided by it); it must divide the GPUs and the model's
                attention and key/value heads, and needs ``data.packing`` and ``model.attn_implementation sdpa_varlen``.
                ``sft-lightning estimate`` says which size fits.
            process_group_backend: ``nccl`` on GPUs and ``gloo`` on CPUs by default.
            timeout: how long a collective waits for the other ranks.
        """
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )
        self.layer_classes = layer_classes
        self.reshard_after_forward = reshard_after_forward
        self.reduce_every_micro_batch = reduce_every_micro_batch
        self.save_distributed_checkpoint = save_distributed_checkpoint
        if sequence_parallel_size < 1:
            raise ConfigError(f"FSDP2Strategy.sequence_parallel_size must be 1 or more, not {sequence_parallel_size}")
        self.sequence_parallel_size = sequence_parallel_size
        self.sequence_group: Optional[dist.ProcessGroup] = None  # this rank's sequence group, once the processes exist
        self._sharded_root: Optional[FSDPModule] = None  # the model shard() made, the root of its FSDP units

    def setup_environment(self) -> None:
        # Lightning 2.6.6 reads the mesh's data-parallel size from this private attribute, where "auto" means the
        # number of nodes (tensor parallelism inside a node). FSDP alone shards over every rank.
        processes = self.num_nodes * self.num_processes
        self._data_parallel_size = processes
        size = self.sequence_parallel_size
        if processes % size:
            raise ConfigError(f"FSDP2Strategy.sequence_parallel_size {size} must divide the {processes} processes "
                              "(trainer.devices x trainer.num_nodes)")
        super().setup_environment()
        if size > 1:
            # Groups of consecutive ranks (mesh rows); the weights stay sharded over every rank.
            mesh = init_device_mesh(self.root_device.type, (processes // size, size),
                                    mesh_dim_names=("data_parallel", "sequence"))
            self.sequence_group = mesh["sequence"].get_group()

    def setup(self, trainer) -> None:
        super().setup(trainer)
        # FSDP2 gathers parameters into storage it keeps; under inference_mode (Lightning's default for evaluation)
        # that storage becomes inference tensors, which the next gather or training step cannot use.
        for loop in (trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop, trainer.test_loop, trainer.predict_loop):
            loop.inference_mode = False

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Lightning enters this around the backward of each micro-batch but the last of an optimizer step."""
        if self.reduce_every_micro_batch or self._sharded_root is None:
            yield
            return
        self._sharded_root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self._sharded_root.set_requires_gradient_sync(True)

    def load_pretrained(
        self, empty: Callable[[], PreTrainedModel], pretrained: Optional[Callable[[], PreTrainedModel]],
        init_buffers: Callable[[PreTrainedModel], None],
    ) -> PreTrainedModel:
        """The model of ``empty()`` (built here on the meta device) sharded over all ranks and holding the weights of
        ``pretrained()``, which only global rank 0 calls; ``pretrained`` None: weights left unset (a checkpoint's
        are loaded next) and the buffers no state dict holds computed by ``init_buffers(model)``."""
        with torch.device("meta"):
            model = empty()
        self.shard(model)
        model.to_empty(device=self.root_device)
        if pretrained is None:
            init_buffers(model)
            return model
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
        # None: FSDP2's own choice for the root, not resharded after forward (backward begins with it)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=None if self.reshard_after_forward else False)
        self._sharded_root = model

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._sharded_root is not None:
            # The root stays gathered after a forward that no backward follows (validation): reshard it, so that the
            # state dict holds shards (torch 2.13's checkpoint writer crashes on the gathered tensors).
            self._sharded_root.reshard()
        return super().lightning_module_state_dict()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Every rank writes its shards into a hidden folder beside ``filepath``, which then replaces it: a run
        killed mid-write leaves the previous checkpoint whole."""
        if not self.save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        write = super().save_checkpoint
        save_beside(self, filepath, lambda partial: write(checkpoint, partial, storage_options))


class FSDP2Model(StrategyModel):
    """The model under :class:`FSDP2Strategy`: built on the meta device by every rank and sharded, the pretrained
    weights read by rank 0 alone and sent in shards (or not read at all when a checkpoint's follow)."""

    sharded = True

    def __init__(self, strategy: FSDP2Strategy) -> None:
        self.strategy = strategy
        self.sequence_group = strategy.sequence_group

    def build(self, causal_lm: CausalLM, pretrained: bool, materialize: bool = True) -> torch.nn.Module:
        size = self.strategy.sequence_parallel_size
        if size > 1:
            with torch.device("meta"):  # the architecture alone, checked before any weight is read
                empty = causal_lm(False)
            check_sequence_parallel(empty.config, size, empty.config._attn_implementation)
        return self.strategy.load_pretrained(
            partial(causal_lm, False), partial(causal_lm, True) if pretrained else None, init_buffers
        )
