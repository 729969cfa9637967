"""Training throughput in the logs: tokens/s (all and supervised), samples/s, padding, MFU and peak memory.

Counts come from the batches themselves (``sample_lengths``, ``labels``) and are summed over ranks when
logged, so they are exact with variable-length batches, packing and any number of devices. MFU uses the
PaLM accounting, ``6 N`` FLOPs per token for the matmul weights plus ``12 L H Q T`` for attention over a
context of ``T`` tokens (each sample's own length when packed); the LM head counts only on the positions whose
next token is trained, the only ones it runs on (``logits_to_keep``). The peak is the GPU's dense bf16/fp16
tensor throughput from :data:`DENSE_PEAK_TFLOPS` (the datasheets' sparse figures are twice that), or
``--throughput.peak_tflops``; MFU is not logged where neither knows the device (a CPU, ``32-true``).
"""

from __future__ import annotations

import resource
import time
from typing import NamedTuple, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from sft_lightning.render import IGNORE_INDEX
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
    """All parameters but an input embedding that is not also the LM head, split into body and head; partitioned
    (ZeRO-3) and sharded (FSDP2) parameters count whole."""
    total = sum(logical_numel(p) for p in model.parameters())
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_params = logical_numel(head.weight) if head is not None else 0
    tied = head is not None and head.weight is embedding.weight
    return FlopParameters(total - head_params - (0 if tied else logical_numel(embedding.weight)), head_params)


def training_flops(config, parameters: FlopParameters, sample_lengths: torch.Tensor, head_positions: torch.Tensor) -> torch.Tensor:
    """Forward + backward FLOPs of one micro-batch: ``6 N`` per token (the LM head's part per position it runs on)
    plus ``12 L H Q`` per token and context token.

    A tensor on the lengths' device, so that counting every micro-batch never waits for the GPU.
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lengths = sample_lengths.double()
    attention = 12 * config.num_hidden_layers * heads * head_dim * lengths.square().sum()
    return 6 * parameters.body * lengths.sum() + 6 * parameters.head * head_positions.double() + attention


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


class ThroughputLogger(Callback):
    def __init__(self, every_n_steps: Optional[int] = None, peak_tflops: Optional[float] = None) -> None:
        """Log ``throughput/*`` and ``memory/peak_gb`` every ``every_n_steps`` optimizer steps, from the training
        batches (:class:`~sft_lightning.collate.PaddedBatch` or ``PackedBatch``) and the module's
        ``flops(sample_lengths, head_positions)``.

        Args:
            every_n_steps: optimizer steps between logs (default: ``trainer.log_every_n_steps``).
            peak_tflops: one device's dense peak TFLOP/s for the training dtype, for MFU (default: the GPU's
                bf16/fp16 figure from the built-in table under ``bf16-*``/``16-*`` precision).
        """
        self.every_n_steps = every_n_steps
        self.peak_tflops = peak_tflops
        self.available_flops: Optional[float] = None
        self._counts = torch.zeros(len(COUNTERS), dtype=torch.float64)
        self._started = 0.0
        self._logged_step = -1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        if self.peak_tflops is not None:
            self.available_flops = self.peak_tflops * 1e12
        elif device.type == "cuda" and str(trainer.precision).startswith(("bf16", "16")):
            self.available_flops = dense_peak_flops(torch.cuda.get_device_name(device))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._counts.zero_()
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        lengths = batch.sample_lengths
        # Each supervised label is predicted at the position before it: where the LM head has to run.
        supervised = (batch.labels != IGNORE_INDEX).sum()
        counts = torch.stack([
            torch.tensor(len(lengths), dtype=torch.float64, device=lengths.device),
            lengths.sum().double(),
            supervised.double(),
            torch.tensor(batch.input_ids.numel(), dtype=torch.float64, device=lengths.device),
            pl_module.flops(lengths, supervised),
        ])
        # Summed where the batch lives: no host round trip per micro-batch, only when logging.
        self._counts = self._counts.to(counts.device) + counts
        step, every = trainer.global_step, self.every_n_steps or trainer.log_every_n_steps
        if step != self._logged_step and step % every == 0:  # the same decision on every rank
            self._logged_step = step
            self._log(trainer)

    def _log(self, trainer: Trainer) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - self._started
        totals = trainer.strategy.reduce(self._counts.to(device), reduce_op="sum").cpu().tolist()
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
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self._counts.zero_()
        self._started = time.perf_counter()
