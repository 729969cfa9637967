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

The optimizer step needs a temporary beside its state: torch's foreach AdamW takes the square root of every second
moment into a new float32 tensor (4 bytes per parameter it steps). FSDP2 accumulating gradients over micro-batches
without reducing them (``FSDP2Strategy.reduce_every_micro_batch`` false, the default) keeps an unsharded float32
gradient on every GPU (4 bytes per parameter). Neither is a model state in DeepSpeed's estimators' sense; both count
in the total.

Sharded runs also hold a working set of gathered weights: FSDP2 keeps the root unit (embeddings, LM head, final
norm) gathered from forward to backward plus two decoder layers in flight (one computing, one prefetched), in
the compute dtype; DeepSpeed's ZeRO-3 two 16-bit copies of its largest module, as DeepSpeed's own estimator
counts. Under mixed precision DeepSpeed keeps 16-bit copies of the weights beside the float32 masters that live
with the optimizer (18 bytes per parameter in all, as its estimators say); offloading moves masters, float32
gradients and moments to the host, whose RAM per node is reported (with DeepSpeed's 1.5 buffer factor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from sft_lightning.adapters import as_lora
from sft_lightning.errors import ConfigError
from sft_lightning.language_model import language_model_config
from sft_lightning.lm_head import CHUNK_ABOVE_MB, CHUNK_TOKENS, in_chunks, logits_bytes
from sft_lightning.moe import moe_of
from sft_lightning.sequence_parallel import divisors

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
    deepspeed: bool = False  # 16-bit weight copies beside float32 masters; ZeRO-3 gathers module by module


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
    working_set: float = 0.0  # gathered weights of the units in flight (sharded weights only)
    host_per_node: float = 0.0  # host RAM that offloading needs on each node
    optimizer_temporary: float = 0.0  # AdamW's step: a float32 square root of the second moments
    accumulated_gradients: float = 0.0  # FSDP2 between reductions: an unsharded float32 gradient
    active: int = 0  # parameters a token goes through (a mixture of experts uses a few of its experts)
    sequence_parallel: int = 1  # GPUs that split each micro-batch along its length
    activations_on_host: float = 0.0  # per GPU, with activation offloading: the saved activations, in host memory

    @property
    def state(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def model_states(self) -> float:
        """Weights, gradients, optimizer and gathered weights: what DeepSpeed's estimators call model states."""
        return self.state + self.working_set

    @property
    def overhead(self) -> float:
        return OVERHEAD_GB * GB + OVERHEAD_SHARE * self._subtotal

    @property
    def total(self) -> float:
        return self._subtotal + self.overhead

    @property
    def _subtotal(self) -> float:
        return self.model_states + self.optimizer_temporary + self.accumulated_gradients + self.activations + self.logits


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
    nodes: int = 1,
    lm_head_chunk_tokens: Optional[int] = CHUNK_TOKENS,
    lm_head_chunk_above_mb: float = CHUNK_ABOVE_MB,
    accumulated_gradients: bool = False,
    activation_offloading: bool = False,
    sequence_parallel: int = 1,
) -> MemoryPlan:
    """Bytes per GPU for training a model of ``config`` (a transformers config) this way.

    ``weight_bytes``: bytes per stored weight (4 for float32 master weights, 2 for bfloat16); ``tokens_per_gpu``:
    tokens in one micro-batch on one GPU; ``supervised_share``: share of positions whose logits are kept;
    ``nodes``: how many nodes the GPUs are on (for the host RAM of offloading); ``lm_head_chunk_tokens``: positions
    whose logits exist at once (``model.lm_head_chunk_tokens``; None: every supervised position), where the whole
    micro-batch's would take more than ``lm_head_chunk_above_mb`` MiB (``model.lm_head_chunk_above_mb``);
    ``accumulated_gradients``: an unsharded float32 gradient is kept between reductions (FSDP2 accumulating);
    ``activation_offloading``: the activations saved for the backward (with checkpointing, each layer's input) are in
    host memory, and the GPU keeps one layer's working set; ``sequence_parallel``: the GPUs that split each micro-batch
    along its length (each holds the activations of ``tokens_per_gpu / sequence_parallel`` tokens).
    """
    counts = count_parameters(config, as_lora(lora))
    parameters, trainable = counts.total, counts.trainable
    frozen = parameters - trainable
    mixed_or_true = 2.0 if ("16" in precision) else 4.0  # bytes of an activation value
    base_bytes = {"4bit": 0.5, "8bit": 1.0}.get(quantization, weight_bytes)
    split = lambda value, sharded: value / gpus if sharded else value  # noqa: E731
    if sharding.deepspeed and "mixed" in precision:
        weights, gradients, optimizer, host = _deepspeed_states(trainable, sharding, gpus)
    else:
        weights = split(trainable * weight_bytes, sharding.weights)
        gradients = split(trainable * weight_bytes, sharding.gradients)
        optimizer = split(trainable * 8.0, sharding.optimizer)
        host = trainable * (weight_bytes * sharding.offload_weights + 8.0 * sharding.offload_optimizer)
        weights, optimizer = weights * (not sharding.offload_weights), optimizer * (not sharding.offload_optimizer)
    weights += 0.0 if sharding.offload_weights else split(frozen * base_bytes, sharding.weights)
    working_set = 0.0
    if sharding.weights and sharding.deepspeed:
        working_set = 2 * 2.0 * counts.largest_module
    elif sharding.weights:
        working_set = mixed_or_true * (counts.outside_layers + 2 * counts.largest_layer)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    tokens = tokens_per_gpu / sequence_parallel
    per_layer = tokens * (10 * hidden + 5 * config.intermediate_size + 4 * kv) * mixed_or_true
    without = per_layer * layers
    with_checkpointing = tokens * hidden * layers * mixed_or_true + per_layer
    positions = tokens * supervised_share
    if lm_head_chunk_tokens and in_chunks(positions, config.vocab_size, mixed_or_true, lm_head_chunk_above_mb * 2**20):
        positions = min(positions, lm_head_chunk_tokens)
    logits = logits_bytes(positions, config.vocab_size, mixed_or_true)
    temporary = 0.0 if sharding.offload_optimizer else split(trainable * 4.0, sharding.optimizer)
    activations = with_checkpointing if checkpointing else without
    on_host = activations - per_layer if activation_offloading else 0.0
    return MemoryPlan(
        parameters, trainable, gpus, sharding, weights, gradients, optimizer, activations - on_host, without,
        with_checkpointing, logits, checkpointing, working_set,
        host * DEEPSPEED_BUFFER_FACTOR / nodes + on_host * gpus / nodes, temporary,
        trainable * 4.0 if accumulated_gradients else 0.0, counts.active, activations_on_host=on_host,
        sequence_parallel=sequence_parallel,
    )


# DeepSpeed's estimators allow this much more host memory than the offloaded states themselves.
DEEPSPEED_BUFFER_FACTOR = 1.5


def _deepspeed_states(trainable: int, sharding: Sharding, gpus: int) -> tuple[float, float, float, float]:
    """DeepSpeed under mixed precision: (weights, gradients, optimizer) per GPU, and the host bytes of all nodes.

    16-bit weights (sharded by ZeRO-3) beside float32 masters that live with the optimizer (sharded from ZeRO-1
    on), float32 gradients (from ZeRO-2 on; ZeRO-2 also holds 16-bit gradient partitions, as DeepSpeed counts).
    Offloading moves masters, float32 gradients and moments (and with the parameters, the 16-bit weights) to the
    host, one copy over all nodes.
    """
    per_gpu = lambda bytes_per_parameter, sharded: bytes_per_parameter * trainable / (gpus if sharded else 1)  # noqa: E731
    sixteen_bit = per_gpu(2, sharding.weights)
    masters, moments = per_gpu(4, sharding.optimizer), per_gpu(8, sharding.optimizer)
    fp32_gradients = per_gpu(4, sharding.gradients)
    sixteen_bit_gradients = per_gpu(2, True) if sharding.gradients and not sharding.weights else 0.0
    host = 0.0
    if sharding.offload_optimizer:
        host += 16.0 * trainable
        masters = moments = fp32_gradients = 0.0
    if sharding.offload_weights:
        host += 2.0 * trainable
        sixteen_bit = 0.0
    return sixteen_bit + masters, fp32_gradients + sixteen_bit_gradients, moments, host


class ParameterCounts(NamedTuple):
    total: int
    trainable: int
    largest_layer: int  # the largest decoder layer, the unit FSDP2 gathers
    outside_layers: int  # embeddings, LM head, final norm: FSDP2's root unit
    largest_module: int  # the most parameters one module holds itself, the unit ZeRO-3 gathers
    active: int  # what a token goes through: a mixture of experts' experts by num_experts_per_tok / num_experts


def decoder_layer_names(model) -> set[str]:
    """Class names of the model's decoder layers: transformers' ``_no_split_modules`` (the blocks that
    ``device_map`` never splits, which FSDP shards one by one), read here only."""
    return set(model._no_split_modules or ())


def count_parameters(config, lora=None) -> ParameterCounts:
    """Parameter counts of a model built from ``config`` on the meta device (trainable: all, or the adapters)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layer_classes = decoder_layer_names(model)
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    in_layers = sum(p.numel() for layer in layers for p in layer.parameters())
    largest_layer = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    moe = moe_of(config)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in f".{name}") if moe else 0
    active = round(total - experts * (1 - moe.top_k / moe.num_experts)) if moe else total
    counts = ParameterCounts(total, total, largest_layer, total - in_layers, largest_module, active)
    if lora is None:
        return counts
    head = model.get_output_embeddings()
    targets = lora.target_modules
    adapters = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in ([targets] if isinstance(targets, str) else targets):
            adapters += lora.r * (module.in_features + module.out_features)
    return counts._replace(total=total + adapters, trainable=adapters)


def model_config(path: str, trust_remote_code: bool = False):
    """A model's config: from its folder, else from configs/models/ (shipped for the presets), else the hub."""
    shipped = SHIPPED_CONFIGS / path.replace("/", "--")
    source = path if Path(path).expanduser().is_dir() else str(shipped) if shipped.is_dir() else path
    try:
        return language_model_config(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code))
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
            return _zero(stage, offload_optimizer=offload, offload_weights=offload and stage == 3, deepspeed=True)
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
        return _zero(int(args.get("stage", 2)), bool(args.get("offload_optimizer")), bool(args.get("offload_parameters")), True)
    return SHARDINGS["ddp"]


def _zero(stage: int, offload_optimizer: bool = False, offload_weights: bool = False, deepspeed: bool = False) -> Sharding:
    base = SHARDINGS[f"zero{stage}"] if stage else SHARDINGS["ddp"]
    name = base.name.split(" / ")[0] if deepspeed else base.name
    offloaded = " and parameters" if offload_weights else ""
    suffix = f" + optimizer{offloaded} offloaded" if offload_optimizer else " + parameters offloaded" if offload_weights else ""
    return Sharding(base.weights, base.gradients, base.optimizer, offload_weights, offload_optimizer,
                    ("DeepSpeed " if deepspeed else "") + name + suffix, deepspeed)


def estimate(config: str, gpus: Optional[int] = None, nodes: Optional[int] = None, gpu_memory_gb: float = 80.0) -> None:
    """Per-GPU memory plan of a training config: weights, gradients, optimizer, activations; does it fit?

    Args:
        config: a ``sft-lightning fit`` config (preset or your own).
        gpus: GPUs in all (default: ``trainer.devices x trainer.num_nodes`` of the config).
        nodes: nodes they are on, for the host RAM per node (default: the config's ``num_nodes``, or with ``gpus``
            as many nodes of ``trainer.devices`` GPUs as ``gpus`` needs).
        gpu_memory_gb: memory of one GPU, to say whether the plan fits.
    """
    plan, name, precision = plan_of_config(config, gpus, nodes)
    print(format_plan(plan, name, precision, gpu_memory_gb))
    advice = fitting_sequence_parallel(config, plan, gpus, nodes, gpu_memory_gb)
    if advice:
        print(advice)


def fitting_sequence_parallel(config: str, plan: MemoryPlan, gpus: Optional[int], nodes: Optional[int],
                              gpu_memory_gb: float) -> str:
    """For an FSDP2 config whose plan does not fit: the smallest ``sequence_parallel_size`` that would (it must divide
    the GPUs and the model's attention and key/value heads), or that none does; "" where the plan fits or the
    strategy is not FSDP2."""
    raw = yaml.safe_load(Path(config).read_text())
    strategy = raw.get("trainer", {}).get("strategy")
    fsdp2 = isinstance(strategy, dict) and strategy["class_path"].endswith("FSDP2Strategy")
    if not fsdp2 or plan.total <= gpu_memory_gb * GB:
        return ""
    model = model_config(raw["model"]["model_name_or_path"], raw["model"].get("trust_remote_code", False))
    heads = model.num_attention_heads
    sizes = [n for n in divisors(heads, getattr(model, "num_key_value_heads", None) or heads, plan.gpus) if n > plan.sequence_parallel]
    for size in sizes:
        candidate = plan_of_config(config, gpus, nodes, sequence_parallel=size)[0]
        if candidate.total <= gpu_memory_gb * GB:
            return (f"  with --trainer.strategy.sequence_parallel_size {size}: {candidate.total / GB:.1f} GB per GPU, fits "
                    f"({plan.gpus // size} data-parallel x {size} sequence-parallel)")
    return f"  no sequence_parallel_size ({', '.join(map(str, sizes)) or 'none divides the GPUs and heads'}) makes it fit"


def plan_of_config(config: str, gpus: Optional[int] = None, nodes: Optional[int] = None,
                   sequence_parallel: Optional[int] = None) -> tuple[MemoryPlan, str, str]:
    """(plan, model name, precision) of a ``fit`` config file, on ``gpus`` GPUs over ``nodes`` nodes (see
    :func:`estimate`); ``sequence_parallel``: instead of the config's ``sequence_parallel_size``."""
    raw = yaml.safe_load(Path(config).read_text())
    trainer, model, data = raw.get("trainer", {}), raw.get("model", {}), raw.get("data", {})
    devices = trainer.get("devices", 1)
    if (gpus is None or nodes is None) and not isinstance(devices, int):
        raise ConfigError(f"{config}: trainer.devices is {devices!r}; give the GPU count with --gpus and --nodes")
    if gpus is None:
        nodes = nodes or trainer.get("num_nodes", 1)
        gpus = devices * nodes
    elif nodes is None:
        nodes = -(-gpus // devices)
    strategy = trainer.get("strategy")
    init_args = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    activation_checkpointing = bool(model.get("gradient_checkpointing")) or bool(init_args.get("activation_checkpointing_policy"))
    precision = str(trainer.get("precision", "32-true"))
    fsdp2 = isinstance(strategy, dict) and strategy["class_path"].endswith("FSDP2Strategy")
    plan = plan_memory(
        model_config(model["model_name_or_path"], model.get("trust_remote_code", False)),
        gpus,
        sharding_of(strategy),
        precision=precision,
        weight_bytes=2.0 if model.get("torch_dtype") in ("bfloat16", "float16") else 4.0,
        tokens_per_gpu=data.get("batch_size", 8) * data.get("max_length", 2048),
        checkpointing=activation_checkpointing,
        lora=model.get("lora"),
        quantization=model.get("quantization"),
        nodes=nodes,
        lm_head_chunk_tokens=model.get("lm_head_chunk_tokens", CHUNK_TOKENS),
        lm_head_chunk_above_mb=model.get("lm_head_chunk_above_mb", CHUNK_ABOVE_MB),
        accumulated_gradients=fsdp2 and trainer.get("accumulate_grad_batches", 1) > 1
        and not init_args.get("reduce_every_micro_batch", False),
        activation_offloading=bool(model.get("activation_offloading")),
        sequence_parallel=sequence_parallel or init_args.get("sequence_parallel_size", 1),
    )
    return plan, model["model_name_or_path"], precision


def format_plan(plan: MemoryPlan, name: str, precision: str, gpu_memory_gb: float) -> str:
    gb = lambda value: f"{value / GB:7.1f} GB"  # noqa: E731
    chosen = "with" if plan.checkpointing else "without"
    active = f" ({plan.active / 1e9:.2f}B active per token)" if plan.active and plan.active < plan.parameters else ""
    size = plan.sequence_parallel
    sequence = f" ({plan.gpus // size} data-parallel x {size} sequence-parallel)" if size > 1 else ""
    lines = [
        f"{name}: {plan.parameters / 1e9:.2f}B parameters{active}, {plan.trainable / 1e9:.3f}B trained; {plan.gpus} GPUs"
        f"{sequence}, {plan.sharding.name}, {precision}",
        f"  weights                              {gb(plan.weights)}",
        f"  gradients                            {gb(plan.gradients)}",
        f"  optimizer (AdamW moments)            {gb(plan.optimizer)}",
        f"  optimizer step temporary             {gb(plan.optimizer_temporary)}",
        *([f"  gradients accumulated, unsharded     {gb(plan.accumulated_gradients)}"] if plan.accumulated_gradients else []),
        f"  gathered weights in flight           {gb(plan.working_set)}",
        f"  activations, checkpointing on        {gb(plan.activations_with_checkpointing)}",
        f"  activations, checkpointing off       {gb(plan.activations_without_checkpointing)}",
        *([f"  activations offloaded to host        {gb(plan.activations_on_host)}"] if plan.activations_on_host else []),
        f"  logits (one chunk of positions)      {gb(plan.logits)}",
        f"  overhead ({OVERHEAD_GB} GB + {OVERHEAD_SHARE:.0%})              {gb(plan.overhead)}",
        f"  total per GPU ({chosen} checkpointing) {gb(plan.total)}",
    ]
    if plan.host_per_node:
        lines.append(f"  host RAM per node for offloading     {gb(plan.host_per_node)}")
    fits = plan.total <= gpu_memory_gb * GB
    verdict = "fits" if fits else "does NOT fit"
    lines.append(f"  {verdict} a {gpu_memory_gb:g} GB GPU ({plan.total / (gpu_memory_gb * GB):.0%} of it)")
    return "\n".join(lines)
