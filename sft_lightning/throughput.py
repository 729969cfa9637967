"""Training throughput in the logs: tokens/s (all and supervised), samples/s, padding, MFU and peak memory.

Counts come from the batches themselves (``sample_lengths``, ``labels``) and are summed over ranks when
logged, so they are exact with variable-length batches, packing and any number of devices. MFU uses the
PaLM accounting, ``6 N`` FLOPs per token for the matmul weights plus ``12 L H Q T`` for attention over a
context of ``T`` tokens (each sample's own length when packed), against the device's peak for the training
dtype (Lightning's table of GPUs; not logged where the peak is unknown, e.g. on a CPU).
"""

from __future__ import annotations

import resource
import time
from typing import Optional

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer

from sft_lightning.render import IGNORE_INDEX
from sft_lightning.zero import logical_numel

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}
COUNTERS = ("samples", "tokens", "supervised_tokens", "slots", "flops")


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but an input embedding that is not also the LM head."""
    total = sum(logical_numel(p) for p in model.parameters())
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    return total if tied else total - logical_numel(embedding.weight)


def training_flops(config, matmul_params: int, sample_lengths: torch.Tensor) -> torch.Tensor:
    """Forward + backward FLOPs of one micro-batch: ``6 N`` per token plus ``12 L H Q`` per token and context token.

    A tensor on the lengths' device, so that counting every micro-batch never waits for the GPU.
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lengths = sample_lengths.double()
    return 6 * matmul_params * lengths.sum() + 12 * config.num_hidden_layers * heads * head_dim * lengths.square().sum()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


class ThroughputLogger(Callback):
    def __init__(self, every_n_steps: Optional[int] = None) -> None:
        """Log ``throughput/*`` and ``memory/peak_gb`` every ``every_n_steps`` optimizer steps.

        Args:
            every_n_steps: optimizer steps between logs (default: ``trainer.log_every_n_steps``).
        """
        self.every_n_steps = every_n_steps
        self.available_flops: Optional[float] = None
        self._counts = torch.zeros(len(COUNTERS), dtype=torch.float64)
        self._started = 0.0
        self._logged_step = -1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        precision = str(trainer.precision)
        dtype = next((d for prefix, d in COMPUTE_DTYPES.items() if precision.startswith(prefix)), torch.float32)
        self.available_flops = get_available_flops(trainer.strategy.root_device, dtype)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._counts.zero_()
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        lengths = batch["sample_lengths"]
        counts = torch.stack([
            torch.tensor(len(lengths), dtype=torch.float64, device=lengths.device),
            lengths.sum().double(),
            (batch["labels"] != IGNORE_INDEX).sum().double(),
            torch.tensor(batch["input_ids"].numel(), dtype=torch.float64, device=lengths.device),
            training_flops(pl_module.model.config, pl_module.matmul_parameters, lengths),
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
        if self.available_flops:
            metrics["throughput/mfu"] = counts["flops"] / elapsed / (self.available_flops * trainer.world_size)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self._counts.zero_()
        self._started = time.perf_counter()
