"""Every shipped YAML parses with the real CLI parser, and its objects (strategy included) instantiate here."""

import re
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

from sft_lightning.lightning_cli import SFTLightningCLI
from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.memory import model_config
from sft_lightning.module import SFTLitModule
from sft_lightning.sequence_parallel import check_sequence_parallel
from sft_lightning.sharding import FSDP2Strategy
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


@pytest.mark.parametrize("overlay", sorted((ROOT / "configs" / "data").glob("*.yaml")), ids=lambda p: p.name)
def test_data_overlays_layer_on_a_preset(overlay: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = SFTLightningCLI(args=["--config", "configs/tiny.yaml", "--config", str(overlay), *CPU_OVERRIDES], run=False)
    assert cli.datamodule.hparams.train_path == yaml.safe_load(overlay.read_text())["data"]["train_path"]
    cli.datamodule.setup("fit")  # every source exists and mixes
    assert len(cli.datamodule.splits["train"].sources) > 1


def test_presets_use_the_intended_precision():
    for config in CONFIGS:
        precision = yaml.safe_load(config.read_text())["trainer"]["precision"]
        assert precision == ("32-true" if config.name == "tiny.yaml" else "bf16-mixed"), config.name


@pytest.mark.parametrize("config", [c for c in CONFIGS if "FSDP2Strategy" in c.read_text()], ids=lambda p: p.name)
def test_fsdp_presets_shard_and_checkpoint_each_decoder_layer(config):
    raw = yaml.safe_load(config.read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    fsdp = parser.instantiate_classes(parser.parse_object({"strategy": raw["trainer"]["strategy"]})).strategy
    assert isinstance(fsdp, FSDP2Strategy) and fsdp.reshard_after_forward
    layers = {"qwen2": Qwen2DecoderLayer, "llama": LlamaDecoderLayer, "qwen3": Qwen3DecoderLayer, "qwen3_moe": Qwen3MoeDecoderLayer,
              "gemma3_text": Gemma3DecoderLayer, "qwen3_5_text": Qwen3_5DecoderLayer}
    layer = layers[model_config(raw["model"]["model_name_or_path"]).model_type]
    assert fsdp.layer_classes == [f"{layer.__module__}.{layer.__name__}"]
    assert raw["model"]["gradient_checkpointing"] and raw["checkpoint"]["save_last"] == "link"


@pytest.mark.parametrize("config", [c for c in CONFIGS if "sequence_parallel_size" in c.read_text()], ids=lambda p: p.name)
def test_long_context_presets_split_their_rows_in_a_way_the_model_and_gpus_allow(config):
    raw = yaml.safe_load(config.read_text())
    trainer, model, data = raw["trainer"], raw["model"], raw["data"]
    size = trainer["strategy"]["init_args"]["sequence_parallel_size"]
    check_sequence_parallel(model_config(model["model_name_or_path"]), size, model["attn_implementation"])
    assert (trainer["devices"] * trainer.get("num_nodes", 1)) % size == 0 and trainer["devices"] % size == 0  # in a node
    assert data["packing"] and data["max_length"] >= 32768 and model["gradient_checkpointing"]


def test_every_model_and_data_option_is_described_in_help(capsys):
    # jsonargparse reads each option's text from the constructor's docstring: one unescaped "\n" in it (an example
    # string) once dropped every --data.* description without a word.
    from sft_lightning.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    blocks = re.split(r"\n  (?=--)", capsys.readouterr().out)
    options = {block.split()[0]: " ".join(block.split("\n", 1)[1:]) for block in blocks if block.startswith(("--model.", "--data."))}
    assert len(options) > 40
    undescribed = [name for name, text in options.items() if not re.sub(r"\(type: .*", "", text, flags=re.S).strip()
                   and not name.endswith(".help")]  # (jsonargparse's help of a class-typed option)
    assert not undescribed
