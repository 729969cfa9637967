"""``sft-lightning estimate``: per-GPU memory of a training config, before renting the GPUs.

The accounting is the usual one (ZeRO paper, Rajbhandari et al. 2020): with float32 master weights under a
``*-mixed`` precision, AdamW costs 4 (weights) + 4 (gradients) + 8 (two moments) = 16 bytes per trained
parameter, sharded over ``W`` GPUs by FSDP full shard / ZeRO-3 (all three), ZeRO-2 / SHARD_GRAD_OP (gradients
and moments) or ZeRO-1 (moments), and moved to the CPU by offloading. A frozen LoRA base holds its weights
only (4-bit QLoRA: half a byte each). Activations per token and decoder layer are ``(10 h + 5 i + 4 kv)``
values (h hidden, i MLP, kv key/value width: the saved inputs of norms, projections, the gated MLP and the
residual stream, with fused attention that keeps no score matrix), calibrated on a measured CPU run; with
activation checkpointing only each layer's input stays, plus one layer recomputed. The model's parameters are
counted exactly, from its config on the meta device (no weights loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from sft_lightning.adapters import as_lora
from sft_lightning.errors import ConfigError

GB = 2**30
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
# CUDA context, NCCL buffers and allocator fragmentation: a fixed part and a share of the rest.
OVERHEAD_GB, OVERHEAD_SHARE = 1.5, 0.10


@dataclass(frozen=True)
class Sharding:
    """Which training state is split over the GPUs, and which is moved to the CPU."""

    weights: bool = False
    gradients: bool = False
    optimizer: bool = False
    offload_weights: bool = False
    offload_optimizer: bool = False
    name: str = "ddp"


SHARDINGS = {
    "ddp": Sharding(),
    "zero1": Sharding(optimizer=True, name="ZeRO-1"),
    "zero2": Sharding(gradients=True, optimizer=True, name="ZeRO-2 / SHARD_GRAD_OP"),
    "zero3": Sharding(True, True, True, name="ZeRO-3 / FSDP FULL_SHARD"),
}


@dataclass(frozen=True)
class MemoryPlan:
    parameters: int
    trainable: int
    gpus: int
    sharding: Sharding
    weights: float  # bytes per GPU
    gradients: float
    optimizer: float
    activations: float  # as configured (checkpointing on or off)
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    logits: float
    checkpointing: bool

    @property
    def state(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        subtotal = self.state + self.activations + self.logits
        return subtotal + OVERHEAD_GB * GB + OVERHEAD_SHARE * subtotal


def plan_memory(
    config,
    gpus: int,
    sharding: Sharding,
    precision: str = "bf16-mixed",
    weight_bytes: float = 4.0,
    tokens_per_gpu: int = 4096,
    checkpointing: bool = False,
    lora=None,
    quantization: Optional[str] = None,
    supervised_share: float = 0.5,
) -> MemoryPlan:
    """Bytes per GPU for training a model of ``config`` (a transformers config) this way.

    ``weight_bytes``: bytes per stored weight (4 for float32 master weights, 2 for bfloat16); ``tokens_per_gpu``:
    tokens in one micro-batch on one GPU; ``supervised_share``: share of positions whose logits are kept.
    """
    parameters, trainable = count_parameters(config, as_lora(lora))
    frozen = parameters - trainable
    mixed_or_true = 2.0 if ("16" in precision) else 4.0  # bytes of an activation value
    base_bytes = {"4bit": 0.5, "8bit": 1.0}.get(quantization, weight_bytes)
    split = lambda value, sharded: value / gpus if sharded else value  # noqa: E731
    weights = 0.0 if sharding.offload_weights else split(frozen * base_bytes + trainable * weight_bytes, sharding.weights)
    gradients = split(trainable * weight_bytes, sharding.gradients)
    optimizer = 0.0 if sharding.offload_optimizer else split(trainable * 8.0, sharding.optimizer)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    per_layer = tokens_per_gpu * (10 * hidden + 5 * config.intermediate_size + 4 * kv) * mixed_or_true
    without = per_layer * layers
    with_checkpointing = tokens_per_gpu * hidden * layers * mixed_or_true + per_layer
    logits = tokens_per_gpu * supervised_share * config.vocab_size * (mixed_or_true + 4 + 4)  # logits, fp32 copy, grad
    return MemoryPlan(
        parameters, trainable, gpus, sharding, weights, gradients, optimizer,
        with_checkpointing if checkpointing else without, without, with_checkpointing, logits, checkpointing,
    )


def count_parameters(config, lora=None) -> tuple[int, int]:
    """(all parameters, trainable ones) of a model built from ``config`` on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if lora is None:
        return total, total
    head = model.get_output_embeddings()
    targets = lora.target_modules
    adapters = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in ([targets] if isinstance(targets, str) else targets):
            adapters += lora.r * (module.in_features + module.out_features)
    return total + adapters, adapters


def model_config(path: str, trust_remote_code: bool = False):
    """A model's config: from its folder, else from configs/models/ (shipped for the presets), else the hub."""
    shipped = SHIPPED_CONFIGS / path.replace("/", "--")
    source = path if Path(path).expanduser().is_dir() else str(shipped) if shipped.is_dir() else path
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ConfigError(f"{path}: no config.json here or in configs/models/, and the hub said: {str(err).splitlines()[0]}") from None


def sharding_of(strategy) -> Sharding:
    """Read the sharding off a config's ``trainer.strategy`` (a name or a class_path/init_args mapping)."""
    if strategy is None or isinstance(strategy, str) and strategy in ("auto", "ddp", "ddp_spawn", "single_device"):
        return SHARDINGS["ddp"]
    if isinstance(strategy, str):
        if strategy.startswith("deepspeed_stage_"):
            stage = int(strategy.split("_")[2])
            offload = strategy.endswith("offload")
            return _zero(stage, offload_optimizer=offload, offload_weights=offload and stage == 3)
        if strategy == "fsdp":
            return SHARDINGS["zero3"]
        raise ConfigError(f"trainer.strategy={strategy!r}: the planner knows ddp, fsdp and deepspeed_stage_N[_offload]")
    name, args = strategy["class_path"].rsplit(".", 1)[-1], strategy.get("init_args", {})
    if name == "FSDPStrategy":
        kind = str(args.get("sharding_strategy", "FULL_SHARD")).upper()
        offload = bool(args.get("cpu_offload"))
        return {"FULL_SHARD": _zero(3, offload, offload), "HYBRID_SHARD": _zero(3, offload, offload),
                "SHARD_GRAD_OP": SHARDINGS["zero2"], "NO_SHARD": SHARDINGS["ddp"]}[kind]
    if name == "FSDP2Strategy":  # layers kept gathered from forward to backward hold like ZeRO-2
        return SHARDINGS["zero3"] if args.get("reshard_after_forward", True) else SHARDINGS["zero2"]
    if name == "DeepSpeedStrategy":
        return _zero(int(args.get("stage", 2)), bool(args.get("offload_optimizer")), bool(args.get("offload_parameters")))
    return SHARDINGS["ddp"]


def _zero(stage: int, offload_optimizer: bool = False, offload_weights: bool = False) -> Sharding:
    base = SHARDINGS[f"zero{stage}"] if stage else SHARDINGS["ddp"]
    suffix = " + CPU offload" if offload_optimizer or offload_weights else ""
    return Sharding(base.weights, base.gradients, base.optimizer, offload_weights, offload_optimizer, base.name + suffix)


def estimate(config: str, gpus: Optional[int] = None, gpu_memory_gb: float = 80.0) -> None:
    """Per-GPU memory plan of a training config: weights, gradients, optimizer, activations; does it fit?

    Args:
        config: a ``sft-lightning fit`` config (preset or your own).
        gpus: GPUs in all (default: ``trainer.devices x trainer.num_nodes`` of the config).
        gpu_memory_gb: memory of one GPU, to say whether the plan fits.
    """
    raw = yaml.safe_load(Path(config).read_text())
    trainer, model, data = raw.get("trainer", {}), raw.get("model", {}), raw.get("data", {})
    if gpus is None:
        devices = trainer.get("devices", 1)
        if not isinstance(devices, int):
            raise ConfigError(f"{config}: trainer.devices is {devices!r}; give the GPU count with --gpus")
        gpus = devices * trainer.get("num_nodes", 1)
    strategy = trainer.get("strategy")
    activation_checkpointing = bool(model.get("gradient_checkpointing")) or (
        isinstance(strategy, dict) and bool(strategy.get("init_args", {}).get("activation_checkpointing_policy"))
    )
    plan = plan_memory(
        model_config(model["model_name_or_path"], model.get("trust_remote_code", False)),
        gpus,
        sharding_of(strategy),
        precision=str(trainer.get("precision", "32-true")),
        weight_bytes=2.0 if model.get("torch_dtype") in ("bfloat16", "float16") else 4.0,
        tokens_per_gpu=data.get("batch_size", 8) * data.get("max_length", 2048),
        checkpointing=activation_checkpointing,
        lora=model.get("lora"),
        quantization=model.get("quantization"),
    )
    print(format_plan(plan, model["model_name_or_path"], trainer.get("precision", "32-true"), gpu_memory_gb))


def format_plan(plan: MemoryPlan, name: str, precision: str, gpu_memory_gb: float) -> str:
    gb = lambda value: f"{value / GB:7.1f} GB"  # noqa: E731
    chosen = "with" if plan.checkpointing else "without"
    lines = [
        f"{name}: {plan.parameters / 1e9:.2f}B parameters, {plan.trainable / 1e9:.3f}B trained; {plan.gpus} GPUs, "
        f"{plan.sharding.name}, {precision}",
        f"  weights                              {gb(plan.weights)}",
        f"  gradients                            {gb(plan.gradients)}",
        f"  optimizer (AdamW moments)            {gb(plan.optimizer)}",
        f"  activations, checkpointing on        {gb(plan.activations_with_checkpointing)}",
        f"  activations, checkpointing off       {gb(plan.activations_without_checkpointing)}",
        f"  logits (supervised positions)        {gb(plan.logits)}",
        f"  overhead ({OVERHEAD_GB} GB + {OVERHEAD_SHARE:.0%})              {gb(plan.total - plan.state - plan.activations - plan.logits)}",
        f"  total per GPU ({chosen} checkpointing) {gb(plan.total)}",
    ]
    fits = plan.total <= gpu_memory_gb * GB
    verdict = "fits" if fits else "does NOT fit"
    lines.append(f"  {verdict} a {gpu_memory_gb:g} GB GPU ({plan.total / (gpu_memory_gb * GB):.0%} of it)")
    return "\n".join(lines)

