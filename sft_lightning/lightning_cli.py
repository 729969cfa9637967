"""SFTLightningCLI: LightningCLI for fit | validate | test | predict, with the links, checks and export of a run.

Shared by the ``sft-lightning`` command (:mod:`sft_lightning.cli`), ``data check`` and the Python API, so that
each parses a config exactly as fit does.
"""

from __future__ import annotations

import re
import shutil
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from sft_lightning.adapters import as_lora, quantization_config
from sft_lightning.checkpoint_loading import module_arguments
from sft_lightning.checkpointing import AtomicCheckpointIO, ResumableCheckpoint, newest_checkpoint
from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.errors import USER_ERRORS, ConfigError, DataError
from sft_lightning.evaluation import GenerationEval
from sft_lightning.export import export
from sft_lightning.fit_summary import FitSummary
from sft_lightning.language_model import causal_lm_config
from sft_lightning.layout import ConnectRunLayout
from sft_lightning.metrics import Tokenize
from sft_lightning.module import SFTLitModule
from sft_lightning.preemption import Preemption
from sft_lightning.render import load_tokenizer
from sft_lightning.throughput import ThroughputLogger
from sft_lightning.writers import JsonlPredictionWriter
from sft_lightning.zero import deepspeed_config, evaluation_checkpoint_refusal

# SFTLitModule arguments that only decide how predict (and chat) generate.
GENERATION_SETTINGS = ("max_new_tokens", "temperature", "top_p")


class SaveRunConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the run's log directory, and nothing where the logger has none: MLflow with a
    database tracking URI (``sqlite:///mlflow.db``, what MLflow 3 asks for) has no folder, and Lightning 2.6.6's
    callback then fails an assertion before the first step. The arguments still reach MLflow as the run's params."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and trainer.log_dir is None:  # a broadcast: every rank asks
            rank_zero_info("config.yaml: the logger has no folder of its own; the arguments are in its hyperparameters")
            self.already_saved = True
            return
        super().setup(trainer, pl_module, stage)


class NoEmptyLogFolder(Callback):
    """A run that fails before its first training step leaves no log folder. Lightning makes the logger's folder
    before the data module's setup (so that loggers have their metadata): bad data found while the ranks of a
    multi-process run prepare their shares, or a resume refused when its checkpoint is restored, would otherwise
    leave a ``version_N`` holding only what every run writes at its start (TensorBoard's event files,
    ``config.yaml``, ``hparams.yaml``). Removed on global rank 0 when it holds nothing else; a folder with anything
    else in it (a checkpoint, an export) is left alone, as is any folder once a step has run."""

    STARTING = ("config.yaml", "hparams.yaml")

    def __init__(self) -> None:
        self.stepped = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stepped = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        logger = trainer.logger
        folder = Path(logger.log_dir) if trainer.is_global_zero and logger is not None and logger.log_dir else None
        if self.stepped or folder is None or not folder.is_dir() or not isinstance(exception, USER_ERRORS):
            return
        if all(entry.is_file() and (entry.name.startswith("events.out.tfevents.") or entry.name in self.STARTING)
               for entry in folder.iterdir()):
            shutil.rmtree(folder)
            with suppress(OSError):  # lightning_logs/, where this run made it
                folder.parent.rmdir()


class SFTLightningCLI(LightningCLI):
    def __init__(self, args=None, **kwargs) -> None:
        with warnings.catch_warnings():
            # `args` given: called from Python on purpose (data check, the API, tests, notebooks) while sys.argv
            # holds the caller's own flags, which is what Lightning warns about; only that warning is silenced.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
            super().__init__(
                SFTLitModule,
                ChatMLDataModule,
                trainer_defaults={"default_root_dir": "outputs"},
                save_config_callback=SaveRunConfig,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,  # the module owns AdamW and its schedule
                # A prefix of an option (--trainer.max_epoch) is an error, not silently that option.
                # Parse errors come back as exceptions, which cli_main prints as one line.
                parser_kwargs={"allow_abbrev": False, "exit_on_error": False, **kwargs.pop("parser_kwargs", {})},
                args=args,
                **kwargs,
            )

    def instantiate_classes(self) -> None:
        """Lightning's, with a class that cannot be made (a logger whose package is missing: ``--trainer.logger
        WandbLogger`` without ``wandb``) told in one line: jsonargparse reports it inside a page about union types."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            problem = re.search(r"Problem with given class_path '([^']+)':\s*(.+)", str(err))
            if problem is None:
                raise
            raise ConfigError(f"{problem.group(1).rpartition('.')[2]}: {problem.group(2).strip()}") from None

    def instantiate_trainer(self, **kwargs):
        """The trainer, after checking that a GPU config has a GPU to run on (Lightning's own error is a traceback)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        accelerator = str(config.trainer.accelerator)
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            source = ", ".join(str(path) for path in config.get("config") or []) or "the config"
            raise ConfigError(
                f"{source} asks for trainer.accelerator={accelerator} and this machine has no CUDA GPU: run it on a GPU "
                "machine, or add --trainer.accelerator=cpu --trainer.devices=1 --trainer.strategy=auto "
                "--trainer.precision=32-true"
            )
        return super().instantiate_trainer(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val_loss",
            "checkpoint.mode": "min",
            "checkpoint.save_last": True,
            "checkpoint.filename": "step{step:06d}-val_loss{val_loss:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({
            "early_stopping.monitor": "val_loss",
            "early_stopping.patience": 3,
            # Only judge after a validation run, so a fit without val data is never stopped for lack of it.
            "early_stopping.check_on_train_epoch_end": False,
        })
        parser.add_lightning_class_args(ThroughputLogger, "throughput")
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.add_lightning_class_args(GenerationEval, "eval")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")

    def _parse_ckpt_path(self) -> None:
        """The model arguments saved in a ``--ckpt_path`` file, under this command's generation settings.

        Lightning 2.6's ``LightningCLI._parse_ckpt_path`` (private; the one override of it here) re-parses every
        saved ``model`` argument over the command line, so ``predict --ckpt_path K --model.temperature 0.7`` would
        silently decode with the settings saved at fit time, and a checkpoint saved with an argument since removed
        (``do_sample``, before ``temperature`` 0 meant greedy) would not parse at all. Its body is the same: read
        ``hyper_parameters`` and parse them as ``model`` options, keeping only what the module still takes.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # no checkpoint, `last` (resolved later) or a sharded folder: nothing to read here
        saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        model = {name: value for name, value in module_arguments(saved).items() if name not in GENERATION_SETTINGS}
        if model:
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument("--output_path", type=Optional[str], default=None,
                                help="JSONL file for the predictions (input messages and the generated text); a "
                                     "path ending in .json gets one JSON array")
            parser.add_argument("--metrics_tokenize", type=Tokenize, default="auto",
                                help="sacreBLEU tokenisation for BLEU and ROUGE-L against references: auto is zh "
                                     "(one token per Chinese or Japanese character) when a reference has CJK text, "
                                     "else 13a")
        return parser

    def _resolve_last_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest checkpoint anywhere under ``trainer.default_root_dir``.

        Lightning's own ``last`` looks only in the new run's version folder, which a restarted process has just
        created empty, and silently starts over. No checkpoint at all (a first run under a requeueing scheduler)
        starts a new run of ``fit``, with a line saying so; validate, test and predict refuse, in one line, rather
        than evaluate the untrained model (a mistyped ``default_root_dir``).
        """
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        root = self.trainer.default_root_dir
        found = newest_checkpoint(root)
        if found is None and self.subcommand != "fit":
            raise ConfigError(f"--ckpt_path last: no checkpoint under {root}: {self.subcommand} would use the untrained "
                              "model (is trainer.default_root_dir the fit run's?)")
        if found is None:
            rank_zero_info(f"--ckpt_path last: no checkpoint under {root} yet; starting a new run")
        else:
            rank_zero_info(f"--ckpt_path last: resuming from {found}")
        config["ckpt_path"] = None if found is None else str(found)

    def _before_any(self) -> None:
        self._check_model_fits_data()
        model = self.model.hparams
        tokenizer = load_tokenizer(model.model_name_or_path, model.trust_remote_code)
        self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        self._resolve_last_checkpoint()
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        config = deepspeed_config(self.trainer.strategy)
        refusal = None if self.subcommand == "fit" else evaluation_checkpoint_refusal(config, ckpt_path)
        if refusal is not None:
            raise ConfigError(refusal)
        # One tokenizer (and one ChatML fallback) for the model and the data; a checkpoint's weights replace the
        # pretrained ones, which are then never read.
        self.model.connect(tokenizer, checkpoint_follows=ckpt_path is not None)
        self.datamodule.connect(tokenizer)
        # Validation and test sources, each with metrics of its own where there are several.
        self.model.connect_sources(self.datamodule.source_names("val"), self.datamodule.source_names("test"))
        # The ranks, sizes and loss divisor, once the strategy has started the processes: the same for both.
        evaluation = [c for c in self.trainer.callbacks if isinstance(c, GenerationEval)]
        for callback in evaluation:
            callback.connect(self.datamodule.held_out_prompts if self.datamodule.hparams.val_path is not None else None)
        self.trainer.callbacks.insert(0, ConnectRunLayout(self.model, self.datamodule, *evaluation))
        self.trainer.callbacks.append(NoEmptyLogFolder())
        if config is not None:
            # DeepSpeed checks train_batch_size = micro-batch x accumulation x ranks; Lightning would read the
            # micro-batch off the loader's batch_sampler, which a loader of whole micro-batches does not have.
            config.setdefault("train_micro_batch_size_per_gpu", self.datamodule.hparams.batch_size)

    def _check_model_fits_data(self) -> None:
        """Fail in a second, before any output exists, on a model that is missing or too short for the data."""
        model = self.model.hparams
        quantization_config(model.quantization, as_lora(model.lora))  # CUDA, bitsandbytes and lora, or one line
        config = causal_lm_config(model.model_name_or_path, model.trust_remote_code)
        positions = getattr(config, "max_position_embeddings", None)
        max_length = self.datamodule.hparams.max_length
        if self.subcommand != "predict" and positions is not None and max_length > positions:
            raise ConfigError(
                f"data.max_length={max_length} is more than the {positions} positions of {model.model_name_or_path} "
                "(max_position_embeddings): lower data.max_length"
            )

    before_validate = before_test = _before_any

    def before_fit(self) -> None:
        self._before_any()
        self.trainer.callbacks.append(FitSummary())
        for callback in self.trainer.callbacks:
            if isinstance(callback, ThroughputLogger):
                callback.connect_sources(self.datamodule.trained_tokens_by_source)
        if self.datamodule.hparams.val_path is None:
            # Without validation there is no val_loss to choose checkpoints by (Lightning would warn every epoch).
            for callback in self.trainer.checkpoint_callbacks:
                if callback.monitor == "val_loss":
                    callback.monitor, callback.filename = None, "step{step:06d}"
            rank_zero_info("no data.val_path: checkpoints keep the latest step, and early stopping never triggers")

    def before_predict(self) -> None:
        self._before_any()
        output_path = self.config.predict.output_path
        if output_path is None:
            raise DataError("predict needs --output_path FILE.jsonl")
        self.trainer.callbacks.append(
            JsonlPredictionWriter(output_path, self.datamodule.predict_records, self.config.predict.metrics_tokenize)
        )
        # Predict logs nothing: no new version_N folder beside the training runs (nor its config.yaml).
        self.trainer.logger = None
        self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, SaveConfigCallback)]

    def after_fit(self) -> None:
        """Export the best weights (else the last) as ``hf_model/`` beside the run's ``checkpoints/``, on global rank 0."""
        callback = self.trainer.checkpoint_callback
        ckpt = callback and (callback.best_model_path or callback.last_model_path)
        if self.trainer.is_global_zero and ckpt:
            export(ckpt, str(callback.export_folder))
        self._leave_together()

    def _leave_together(self) -> None:
        """Every rank waits for the others (rank 0 exporting), then closes its process group. A rank that exits with
        its group open while another still works can abort in the backend's teardown ("terminate called without an
        active exception", seen with gloo), failing a run that has finished."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    after_validate = after_test = after_predict = _leave_together
