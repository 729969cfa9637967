"""Checkpoints that survive a kill: atomic writes (files, and the sharded folders of FSDP2 and DeepSpeed),
``--ckpt_path last`` that finds the newest one of a run, and the module's arguments as a checkpoint keeps them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sft_lightning.adapters import as_lora, lora_dict


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint beside its path, flush it to disk, then rename it into place.

    A process killed mid-write (SIGKILL, OOM, a lost node) leaves the previous ``last.ckpt`` intact and at most a
    hidden ``.partial`` file, never a truncated checkpoint that a resume would choke on. Remote (``s3://`` ...)
    paths keep Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that ``last.ckpt`` is also written every ``every_n_train_steps`` before
    the monitored metric first exists, and that ``save_last: link`` never links to an older step.

    Lightning defers every save, ``last`` included, until validation has produced ``val_loss``; in a long first
    epoch that would leave nothing to resume from. Top-k selection by the metric is unchanged.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._saved_at_step = -1  # global step of the newest checkpoint this callback wrote

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_at_step = trainer.global_step

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        # Lightning 2.6.6 (save_last="link") links last.ckpt to the newest checkpoint written even when that one is
        # from an earlier step (top-k kept nothing at this one), and --ckpt_path last would go back in time. Link
        # only to a checkpoint of this step; otherwise write last.ckpt in full.
        if self.save_last != "link" or self._saved_at_step == trainer.global_step:
            return super()._save_last_checkpoint(trainer, monitor_candidates)
        self.save_last = True
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self.save_last = "link"

    @property
    def run_folder(self) -> Path:
        """The run's own folder, holding ``checkpoints/``: ``<save_dir>/<name>/<version>`` of the first logger, as
        Lightning lays checkpoints out for every logger (TensorBoard's and CSV's ``version_N``, a W&B or MLflow run);
        known on every rank once the callback is set up."""
        return Path(self.dirpath).parent

    @property
    def export_folder(self) -> Path:
        """Where fit exports the best weights as a Hugging Face folder."""
        return self.run_folder / "hf_model"

    def on_train_start(self, trainer, pl_module) -> None:
        # Known from the start, so a run interrupted before the export still says where it would be.
        for logger in trainer.loggers:
            logger.log_hyperparams({"exported_model": str(self.export_folder)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self._every_n_train_steps
        if not (self.save_last and every and trainer.global_step % every == 0) or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor not in candidates:
            self._save_last_checkpoint(trainer, candidates)


def run_folder(trainer) -> Optional[Path]:
    """The run's own folder, where ``checkpoints/``, ``hf_model/`` and ``generations/`` go: the checkpoint callback's
    (:attr:`ResumableCheckpoint.run_folder`), else the trainer's ``log_dir`` (a broadcast: ask on every rank)."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ResumableCheckpoint) and callback.dirpath:
        return callback.run_folder
    return None if trainer.log_dir is None else Path(trainer.log_dir)


def newest_checkpoint(root: str | Path) -> Optional[Path]:
    """The most recently written ``*.ckpt`` under ``root`` (every version of the run), or None."""
    # Sharded checkpoints (FSDP, DeepSpeed) are folders named like files.
    found = [path for path in Path(root).expanduser().rglob("*.ckpt") if path.is_file() or path.is_dir()]
    return max(found, key=lambda path: path.stat().st_mtime_ns, default=None)


def save_beside(strategy, filepath, write: Callable[[Path], None]) -> None:
    """A checkpoint folder that every rank writes part of (``write(folder)`` on each), written into a hidden folder
    beside ``filepath`` that then replaces it: a run killed mid-write leaves the previous checkpoint whole, never a
    mix of two steps that ``--ckpt_path last`` would pick."""
    path = Path(strategy.broadcast(str(filepath)))
    partial = path.with_name(f".{path.name}.partial")
    if strategy.is_global_zero:
        shutil.rmtree(partial, ignore_errors=True)
    strategy.barrier()
    write(partial)
    strategy.barrier()
    if strategy.is_global_zero:
        replace_path(partial, path)
    strategy.barrier()


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


def portable_arguments(hparams) -> dict[str, Any]:
    """The module's arguments as a checkpoint needs them: loadable with ``weights_only`` (LoRA as a plain dict), and a
    local model folder as an absolute path (checkpoints are exported and resumed from other working directories)."""
    portable = {"lora": lora_dict(as_lora(hparams.lora))}
    if Path(hparams.model_name_or_path).expanduser().is_dir():
        portable["model_name_or_path"] = str(Path(hparams.model_name_or_path).expanduser().resolve())
    return portable


def drop_head_copy(state_dict: dict) -> dict:
    """``state_dict`` without the second copy of the LM head that checkpoints written before 2026-12 hold (the module
    kept the head as an attribute of its own, ``_scoring_head``)."""
    for name in [name for name in state_dict if name.startswith("_scoring_head.")]:
        del state_dict[name]
    return state_dict
