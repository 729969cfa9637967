"""Preemption: on SIGTERM or SIGUSR1, save a checkpoint at the next optimizer-step boundary and leave cleanly.

Schedulers send SIGTERM (Kubernetes, SLURM at the time limit, spot instances) or the signal asked for with
``#SBATCH --signal=USR1@90`` a grace period before they kill a job. The handler only records the signal; the
callback acts after the next optimizer step, where model, optimizer, scheduler and data position agree, so the
run resumes exactly (``--ckpt_path last``). Every rank takes part in the save (sharded strategies need them
all); a signal that reached any rank stops all of them. On SIGUSR1 under SLURM the job is also requeued.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised on every rank once the preemption checkpoint is written; the CLI exits 0 with ``message``."""

    def __init__(self, message: str, is_global_zero: bool) -> None:
        super().__init__(message)
        self.is_global_zero = is_global_zero


class Preemption(Callback):
    def __init__(self, requeue_on_slurm: bool = True) -> None:
        """Save and stop on SIGTERM / SIGUSR1 (see the module docstring).

        Args:
            requeue_on_slurm: on SIGUSR1 inside a SLURM job, ``scontrol requeue`` it after the save, so the
                same batch script starts again (give it ``--ckpt_path last``).
        """
        self.requeue_on_slurm = requeue_on_slurm
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}
        self._checked_step = -1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Installed after Lightning's own handlers (set when the run starts), replacing them for the training loop:
        # Lightning would stop after whichever micro-batch comes next, mid-accumulation, without a checkpoint.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._checked_step:
            return  # still accumulating: not a step boundary
        self._checked_step = trainer.global_step
        if trainer.world_size > 1:  # a signal that reached any rank stops all of them, at the same step
            received = torch.tensor(self.received or 0, device=trainer.strategy.root_device)
            if not trainer.strategy.reduce(received, reduce_op="sum").item():
                return
        elif not self.received:
            return
        signum = self.received or signal.SIGTERM  # the rank that got no signal reports the usual one
        path = self._checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        requeued = ""
        if signum == signal.SIGUSR1 and self.requeue_on_slurm and "SLURM_JOB_ID" in os.environ and trainer.is_global_zero:
            requeued = self._requeue(os.environ["SLURM_JOB_ID"])
        name = signal.Signals(signum).name
        raise Preempted(
            f"{name} received: saved step {trainer.global_step} to {path}{requeued}; resume with the same command "
            f"and --ckpt_path last",
            trainer.is_global_zero,
        )

    @staticmethod
    def _checkpoint_path(trainer: Trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = callback.dirpath if callback is not None and callback.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return Path(folder) / "last.ckpt"

    @staticmethod
    def _requeue(job_id: str) -> str:
        try:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        except OSError as err:
            rank_zero_warn(f"scontrol requeue {job_id} failed: {err}")
            return ""
        if result.returncode != 0:
            rank_zero_warn(f"scontrol requeue {job_id} failed: {result.stderr.strip()}")
            return ""
        return f"; SLURM job {job_id} requeued"
