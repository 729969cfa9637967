"""What training under Lightning's DeepSpeedStrategy needs beyond Lightning: the pieces DeepSpeed does its own way.

- ZeRO-3 builds the model inside ``deepspeed.zero.Init``; ``from_pretrained`` only loads its weights into the
  partitioned parameters while a ``HfDeepSpeedConfig`` of the run's config is alive.
- ``zero.Init`` creates every floating tensor in the training dtype, the rotary ``inv_freq`` buffer included; in
  bfloat16 its phases drift by up to 7 radians at position 4095, so it is rebuilt in float32.
- DeepSpeed owns gradient accumulation: ``engine.backward`` divides the loss by the accumulation count a second
  time (Lightning already did), and Lightning calls the optimizer hooks on every micro-batch.
- An offloaded optimizer must be DeepSpeed's CPU Adam; DeepSpeed rejects torch's.
- Lightning's strategy writes checkpoints in place (it bypasses CheckpointIO) and lets DeepSpeed reduce gradients in
  the 16-bit training dtype: :class:`DeepSpeedStrategy` writes beside and renames, and reduces in float32.

Nothing here imports DeepSpeed unless a DeepSpeed strategy is in use.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.strategies import Strategy

from sft_lightning.checkpointing import save_beside
from sft_lightning.strategy_model import CausalLM, StrategyModel


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy (same arguments), with checkpoints that survive a kill and float32 gradients.

    - A checkpoint folder is written beside its final name by every rank, then renamed into place, as FSDP2's are:
      Lightning's writes ``last.ckpt/`` in place, and a run killed mid-save leaves a mix of two steps.
    - Gradients are averaged across ranks in float32 (``communication_data_type``), as FSDP2 reduces them, unless
      the config sets it: DeepSpeed's default under bf16 is bf16, which rounds away small gradient components.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config is not None:
            self.config.setdefault("communication_data_type", "fp32")

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        write = super().save_checkpoint
        save_beside(self, filepath, lambda partial: write(checkpoint, partial, storage_options))


class DeepSpeedModel(StrategyModel):
    """The model under a DeepSpeed strategy: built inside ``zero.Init`` under ZeRO-3 (with transformers told the
    config), rotary buffers rebuilt in float32 before the first forward, optimizer hooks that precede a step only at
    the accumulation boundary, DeepSpeed's CPU Adam where the optimizer is offloaded."""

    def __init__(self, strategy: LightningDeepSpeedStrategy, config: dict[str, Any]) -> None:
        self.strategy, self.deepspeed = strategy, config
        self.sharded = is_zero3(config)
        self._loading = None  # transformers' view of the ZeRO-3 config, alive from the build to the teardown

    def build(self, causal_lm: CausalLM, pretrained: bool, materialize: bool = True) -> torch.nn.Module:
        if not self.sharded:
            return super().build(causal_lm, pretrained, materialize)
        self._loading = zero3_loading(self.deepspeed)
        return causal_lm(pretrained)  # partitioned as it is built: never on the meta device

    def prepare(self, model: torch.nn.Module) -> None:
        float32_rotary_buffers(model)  # built under zero.Init (whose context has ended by now) in the training dtype

    def at_optimizer_step(self) -> bool:
        return at_optimizer_step(self.strategy)

    def optimizer(self, groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        if not offloads_optimizer(self.deepspeed):
            return super().optimizer(groups, lr, betas)
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # an offloaded optimizer must be DeepSpeed's, in AdamW mode

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)

    def teardown(self) -> None:
        if self._loading is not None:
            self._loading = None
            end_zero3_loading()


def deepspeed_config(strategy: Optional[Strategy]) -> Optional[dict[str, Any]]:
    """The DeepSpeed config of a DeepSpeed strategy, else None."""
    return strategy.config if isinstance(strategy, LightningDeepSpeedStrategy) else None


def is_zero3(config: Optional[dict[str, Any]]) -> bool:
    return bool(config) and config.get("zero_optimization", {}).get("stage") == 3


def offloads_optimizer(config: Optional[dict[str, Any]]) -> bool:
    device = (config or {}).get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def zero3_loading(config: dict[str, Any]):
    """Returns an object to keep alive while ``from_pretrained`` runs under ``zero.Init`` (and after: transformers
    consults it again when it resizes embeddings or generates)."""
    # Imported before the model code: imported inside zero.Init, torch._dynamo's polyfills fail against DeepSpeed's
    # patched tensor constructors (DeepSpeed 0.19.8, torch 2.13).
    import torch._dynamo  # noqa: F401
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def end_zero3_loading() -> None:
    """Forget the run's ZeRO-3 config, so that later models in this process (the export after fit) build plainly."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def float32_rotary_buffers(model: torch.nn.Module) -> int:
    """Rebuild, in float32, every rotary embedding buffer that is not float32; returns how many modules changed.

    Call it outside ``zero.Init`` (which would make the new buffers bfloat16 again): the module is constructed
    afresh from its config on the CPU, which computes the buffers exactly as ``from_pretrained`` does.
    """
    rebuilt = 0
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor) or inv_freq.dtype == torch.float32 or not hasattr(module, "config"):
            continue
        fresh = type(module)(config=module.config)
        for name, buffer in fresh.named_buffers(recurse=False):
            module.register_buffer(name, buffer.to(inv_freq.device), persistent=False)
        rebuilt += 1
    return rebuilt


def logical_numel(parameter: torch.nn.Parameter) -> int:
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def at_optimizer_step(strategy: Strategy) -> bool:
    """Whether the optimizer is about to step. Under DeepSpeed, Lightning runs the optimizer hooks after every
    micro-batch and the engine steps only at the accumulation boundary."""
    if not isinstance(strategy, LightningDeepSpeedStrategy):
        return True
    return strategy.deepspeed_engine.is_gradient_accumulation_boundary()


def evaluation_checkpoint_refusal(config: Optional[dict[str, Any]], ckpt_path: Optional[str]) -> Optional[str]:
    """Why ``validate/test/predict --ckpt_path`` cannot load this checkpoint, or None. DeepSpeed 0.19.8 restores
    ZeRO-3 weights only through the optimizer's float32 partitions, which an evaluation engine does not have
    (``engine.load_checkpoint`` fails in ``_restore_from_bit16_weights``); the exported folder loads fine."""
    if ckpt_path is None or not is_zero3(config):
        return None
    return (f"{ckpt_path}: DeepSpeed cannot load a ZeRO-3 checkpoint to evaluate or predict (only to resume training): "
            f"export it (sft-lightning export --ckpt_path {ckpt_path} --output_dir D) and run with "
            "--model.model_name_or_path D instead of --ckpt_path")


def skips_nonfinite_steps(config: dict[str, Any]) -> bool:
    """Whether DeepSpeed itself skips a step whose gradients overflow: ZeRO-1/2 in fp16, or in bf16 with its
    ``check_grad_overflow`` on. ZeRO-3 checks only in fp16, and fp32 never."""
    stage = config.get("zero_optimization", {}).get("stage", 0)
    fp16 = config.get("fp16", {}).get("enabled", False)
    bf16 = config.get("bf16", {}).get("enabled", False) and config["bf16"].get("check_grad_overflow", True)
    return fp16 or (stage in (1, 2) and bf16)
