"""Every shipped YAML parses with the real CLI parser, and its objects (strategy included) instantiate here."""

from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy

from sft_lightning.cli import SFTLightningCLI
from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.module import SFTLitModule
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# GPU presets are instantiated on this CPU with a CPU trainer; their strategy is instantiated on its own below.
CPU_OVERRIDES = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_instantiates(config: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = SFTLightningCLI(args=["--config", str(config), *CPU_OVERRIDES], run=False)
    assert isinstance(cli.model, SFTLitModule) and isinstance(cli.datamodule, ChatMLDataModule)
    # the tokenizer path is set once, on the model, and linked into the data module
    assert cli.datamodule.hparams.tokenizer_path == cli.config.model.model_name_or_path
    assert cli.trainer.checkpoint_callback.monitor == "val_loss"
    raw = yaml.safe_load(config.read_text())
    strategy = raw["trainer"].get("strategy")
    if isinstance(strategy, dict):
        parser = ArgumentParser()
        parser.add_argument("--strategy", type=Strategy)
        instance = parser.instantiate_classes(parser.parse_object({"strategy": strategy})).strategy
        assert type(instance).__name__ == strategy["class_path"].rsplit(".", 1)[1]


def test_presets_use_the_intended_precision():
    for config in CONFIGS:
        precision = yaml.safe_load(config.read_text())["trainer"]["precision"]
        assert precision == ("32-true" if config.name == "tiny.yaml" else "bf16-mixed"), config.name


def test_fsdp_preset_wraps_and_checkpoints_each_decoder_layer():
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    raw = yaml.safe_load((ROOT / "configs" / "llama3-8b.yaml").read_text())["trainer"]["strategy"]
    fsdp = parser.instantiate_classes(parser.parse_object({"strategy": raw})).strategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert fsdp.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert fsdp._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
