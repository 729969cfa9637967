"""Training throughput in the logs: tokens/s (all and supervised), samples/s, padding, MFU and peak memory.

Counts come from the batches themselves (their :class:`~sft_lightning.collate.BatchCounts`, computed on the host by
the collate) and are summed over ranks when logged, so they are exact with variable-length batches, packing and any
number of devices, and counting never touches the GPU. MFU uses the
PaLM accounting, ``6 N`` FLOPs per token for the matmul weights plus ``12 L H Q T`` for attention over a
context of ``T`` tokens (each sample's own length when packed); the LM head counts only on the positions whose
next token is trained, the only ones it runs on (``logits_to_keep``). The peak is the GPU's dense bf16/fp16
tensor throughput from :data:`DENSE_PEAK_TFLOPS` (the datasheets' sparse figures are twice that), or
``--throughput.peak_tflops``; MFU is not logged where neither knows the device (a CPU, ``32-true``).
"""

from __future__ import annotations

import resource
import time
from typing import Callable, NamedTuple, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from sft_lightning.collate import BatchCounts
from sft_lightning.moe import moe_of
from sft_lightning.zero import logical_numel

COUNTERS = ("samples", "tokens", "supervised_tokens", "slots", "flops")
# Dense bf16 / fp16 tensor-core TFLOP/s per GPU (vendor datasheets), matched in order against
# torch.cuda.get_device_name(): the more specific names first.
DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0), ("B200", 2250.0), ("H200 NVL", 835.0), ("H200", 989.4), ("GH200", 989.4),
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L20", 119.5), ("L4", 121.0),
    ("A6000", 154.8), ("A40", 149.7), ("A10", 125.0), ("RTX 4090", 165.2), ("MI300X", 1307.4), ("MI250X", 383.0),
)


def dense_peak_flops(device_name: str) -> Optional[float]:
    """The device's dense bf16/fp16 FLOP/s from :data:`DENSE_PEAK_TFLOPS`, or None for a device it does not list."""
    return next((tflops * 1e12 for name, tflops in DENSE_PEAK_TFLOPS if name in device_name), None)


class FlopParameters(NamedTuple):
    """Parameters that take part in a matmul: the body on every token, the LM head on the positions it runs on."""

    body: int
    head: int


def matmul_parameters(model: torch.nn.Module) -> FlopParameters:
    """All parameters a token goes through but an input embedding that is not also the LM head, split into body and
    head; partitioned (ZeRO-3) and sharded (FSDP2) parameters count whole, a mixture of experts' experts by the share
    a token uses (``num_experts_per_tok / num_experts``)."""
    total = sum(logical_numel(p) for p in model.parameters())
    moe = moe_of(model.config)
    if moe is not None:
        experts = sum(logical_numel(p) for name, p in model.named_parameters() if ".experts." in f".{name}")
        total -= experts * (1 - moe.top_k / moe.num_experts)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_params = logical_numel(head.weight) if head is not None else 0
    tied = head is not None and head.weight is embedding.weight
    return FlopParameters(round(total - head_params - (0 if tied else logical_numel(embedding.weight))), head_params)


def training_flops(config, parameters: FlopParameters, counts: BatchCounts) -> float:
    """Forward + backward FLOPs of one micro-batch: ``6 N`` per token (the LM head's part per position it runs on)
    plus ``12 L H Q`` per token and context token."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 12 * config.num_hidden_layers * heads * head_dim * counts.squared_lengths
    return 6.0 * parameters.body * counts.tokens + 6.0 * parameters.head * counts.supervised + attention


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


class ThroughputLogger(Callback):
    def __init__(self, every_n_steps: Optional[int] = None, peak_tflops: Optional[float] = None) -> None:
        """Log ``throughput/*`` and ``memory/peak_gb`` every ``every_n_steps`` optimizer steps, from the training
        batches' ``counts`` and the module's ``flops(counts)``.

        Args:
            every_n_steps: optimizer steps between logs (default: ``trainer.log_every_n_steps``).
            peak_tflops: one device's dense peak TFLOP/s for the training dtype, for MFU (default: the GPU's
                bf16/fp16 figure from the built-in table under ``bf16-*``/``16-*`` precision).
        """
        self.every_n_steps = every_n_steps
        self.peak_tflops = peak_tflops
        self.available_flops: Optional[float] = None
        self._counts = [0.0] * len(COUNTERS)  # summed on the host, reduced over ranks only when logging
        self._started = 0.0
        self._logged_step = -1
        self._trained_by_source: Callable[[], dict[str, int]] = dict

    def connect_sources(self, trained_by_source: Callable[[], dict[str, int]]) -> None:
        """Also log ``train_tokens/<source>``: the supervised tokens trained from each source so far, all ranks
        together (:meth:`ChatMLDataModule.trained_tokens_by_source`)."""
        self._trained_by_source = trained_by_source

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        if self.peak_tflops is not None:
            self.available_flops = self.peak_tflops * 1e12
        elif device.type == "cuda" and str(trainer.precision).startswith(("bf16", "16")):
            self.available_flops = dense_peak_flops(torch.cuda.get_device_name(device))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._counts = [0.0] * len(COUNTERS)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        counts = batch.counts
        batch_totals = (counts.samples, counts.tokens, counts.supervised, counts.slots, pl_module.flops(counts))
        self._counts = [total + value for total, value in zip(self._counts, batch_totals)]
        step, every = trainer.global_step, self.every_n_steps or trainer.log_every_n_steps
        if step != self._logged_step and step % every == 0:  # the same decision on every rank
            self._logged_step = step
            self._log(trainer)

    def _log(self, trainer: Trainer) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - self._started
        local = torch.tensor(self._counts, dtype=torch.float64, device=device)
        totals = trainer.strategy.reduce(local, reduce_op="sum").cpu().tolist()
        counts = dict(zip(COUNTERS, totals))
        metrics = {
            "throughput/tokens_per_s": counts["tokens"] / elapsed,
            "throughput/supervised_tokens_per_s": counts["supervised_tokens"] / elapsed,
            "throughput/samples_per_s": counts["samples"] / elapsed,
            "throughput/padding_fraction": 1 - counts["tokens"] / max(counts["slots"], 1),
            "memory/peak_gb": peak_memory_gb(device),
        }
        if device.type == "cuda":  # what the allocator holds (cached blocks included): what must fit the GPU
            metrics["memory/peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        if self.available_flops:
            metrics["throughput/mfu"] = counts["flops"] / elapsed / (self.available_flops * trainer.world_size)
        metrics.update({f"train_tokens/{name}": tokens for name, tokens in self._trained_by_source().items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self._counts = [0.0] * len(COUNTERS)
        self._started = time.perf_counter()
