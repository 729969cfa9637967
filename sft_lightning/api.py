"""Python entry points for notebooks and scripts, in the shape the seed trainer's users know.

    from sft_lightning.api import ChatMLDataProcessor, get_config, train

    processor = ChatMLDataProcessor()
    processor.save_chatml_data([processor.create_chatml_sample("你是一个有用的AI助手。", "什么是机器学习？", "机器学习是...")],
                               "data/my.json")
    config = get_config("qwen2.5-0.5b")            # the dict `sft-lightning fit --config configs/qwen2.5-0.5b.yaml` runs
    result = train("tiny", {"trainer.max_epochs": 1, "data.train_path": "data/my.json"})
    result.hf_model                                # the exported Hugging Face folder

Everything runs through the same parser and classes as the ``sft-lightning`` command.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from sft_lightning.checkpointing import run_folder
from sft_lightning.lightning_cli import SFTLightningCLI
from sft_lightning.data import create_chatml_sample, save_chatml_data
from sft_lightning.errors import ConfigError
from sft_lightning.records import read_records

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class ChatMLDataProcessor:
    """Make, save and load ChatML ``messages`` data (the seed's ``data_utils.ChatMLDataProcessor``)."""

    create_chatml_sample = staticmethod(create_chatml_sample)
    save_chatml_data = staticmethod(save_chatml_data)

    @staticmethod
    def load_chatml_data(path: Union[str, Path]) -> list[dict]:
        """The conversations of a JSON array or JSONL file (ChatML, ShareGPT or Alpaca rows), validated as fit
        reads them, as ``{"messages": [...]}`` dicts (with ``tools`` where a row has them)."""
        return [{"messages": r.messages, **({"tools": r.tools} if r.tools else {})} for r in read_records(str(path))]


def config_path(name: Union[str, Path]) -> Path:
    """A preset's file (``qwen2.5-0.5b`` is ``configs/qwen2.5-0.5b.yaml``) or a YAML path as given."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        return path
    preset = CONFIGS / f"{name}.yaml"
    if not preset.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise ConfigError(f"{name!r} is not a preset; presets: {names}")
    return preset


class _ParseOnly(SFTLightningCLI):
    """The fit parser and its defaults, with nothing instantiated (no trainer, so a GPU preset parses on a CPU)."""

    def instantiate_classes(self) -> None:
        pass


def get_config(name: Union[str, Path]) -> dict[str, Any]:
    """A preset (``tiny``, ``qwen2.5-0.5b``, ``llama3-8b``, ...) or YAML file as the complete dict that ``fit`` runs:
    every value the config sets, and every default it leaves (``model``, ``data``, ``trainer``, ``checkpoint``, ...).
    Change it and give it to :func:`train`."""
    cli = _ParseOnly(args=["--config", str(config_path(name))], run=False)
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    config.pop("config", None)
    return config


@dataclass(frozen=True)
class TrainResult:
    log_dir: Path  # the run's folder: TensorBoard events, config.yaml, checkpoints/
    checkpoint: Optional[Path]  # the best checkpoint (else the last)
    hf_model: Optional[Path]  # the exported Hugging Face folder, ready for transformers, chat and serving


def train(config: Union[str, Path, dict] = "tiny", overrides: Optional[dict[str, Any]] = None) -> TrainResult:
    """Run ``sft-lightning fit`` in this process and say where its outputs are.

    Args:
        config: a preset name, a YAML path, or a dict from :func:`get_config`.
        overrides: dotted keys as on the command line, e.g. ``{"trainer.max_epochs": 3, "data.batch_size": 4,
            "model.learning_rate": 5e-5}``.
    """
    with tempfile.TemporaryDirectory() as folder:
        if isinstance(config, dict):
            path = Path(folder) / "config.yaml"
            path.write_text(yaml.safe_dump(config, allow_unicode=True))
        else:
            path = config_path(config)
        flags = [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in (overrides or {}).items()]
        cli = SFTLightningCLI(args=["fit", "--config", str(path), *flags])
    callback = cli.trainer.checkpoint_callback
    log_dir = run_folder(cli.trainer)
    checkpoint = callback and (callback.best_model_path or callback.last_model_path)
    hf_model = log_dir / "hf_model"
    return TrainResult(log_dir, Path(checkpoint) if checkpoint else None, hf_model if hf_model.is_dir() else None)
