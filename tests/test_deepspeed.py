"""DeepSpeed presets through ``sft-lightning fit`` on 2 CPU processes (gloo), with the real Lightning and DeepSpeed
code (``tests/cpu_deepspeed.py`` lifts only Lightning's CUDA-only steps): ZeRO-3 loads the pretrained weights into
its partitions, RoPE stays float32, each optimizer step applies the token-exact gradient of one process, and
``train_loss`` is the step's token mean."""

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
from safetensors.torch import load_file

from sft_lightning.checkpoint_loading import load_trained_module
from sft_lightning.cli import cli_main
from sft_lightning.zero import DeepSpeedStrategy, at_optimizer_step, deepspeed_config, offloads_optimizer, skips_nonfinite_steps
from tests.conftest import ROOT, TINY_QWEN, cli_fit, fit_here
from tests.helpers import IN_CHUNKS, assert_same_gradients

PRESETS = sorted((ROOT / "configs").glob("*deepspeed.yaml"))


class StepRecorder(L.Callback):
    """Test helper: the full gradient of each optimizer step (gathered from ZeRO partitions), the weights at the
    start (gathered), the RoPE dtype after the first forward and the last ``train_loss``; rank 0 saves them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps, self.record = [], {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.record["start"] = {n: full(p, trainer) for n, p in pl_module.model.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if at_optimizer_step(trainer.strategy):
            self.steps.append({n: full(p, trainer, grad=True) for n, p in pl_module.model.named_parameters()})

    def on_train_end(self, trainer, pl_module) -> None:
        self.record.update(steps=self.steps, train_loss=trainer.callback_metrics["train_loss"].item(),
                           inv_freq=str(pl_module.model.model.rotary_emb.inv_freq.dtype))
        if trainer.is_global_zero:
            torch.save(self.record, self.path)


def full(parameter, trainer, grad: bool = False) -> torch.Tensor:
    if deepspeed_config(trainer.strategy) is None:
        return (parameter.grad if grad else parameter).detach().clone()
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    return (safe_get_full_grad if grad else safe_get_full_fp32_param)(parameter).detach().clone()


PRESET = "qwen2.5-7b-deepspeed.yaml"


def on_cpu(root, *extra: str) -> list[str]:
    """The ZeRO-3 preset's options for this CPU, a tiny model and 2 recorded steps."""
    return [
        "--trainer.accelerator=cpu", "--trainer.precision=32-true",
        IN_CHUNKS,
        f"--model.model_name_or_path={TINY_QWEN}", "--model.learning_rate=1e-3", "--model.weight_decay=0.1",
        "--data.max_length=128", "--data.num_workers=0", "--trainer.max_steps=2",
        "--trainer.callbacks+=tests.test_deepspeed.StepRecorder", f"--trainer.callbacks.path={root / 'record.pt'}", *extra,
    ]


def fit(root, *extra: str) -> subprocess.CompletedProcess:
    return cli_fit(PRESET, root, *on_cpu(root, *extra))


@pytest.mark.slow
def test_zero3_preset_on_two_processes_equals_one_process(tmp_path):
    zero3 = fit(tmp_path / "zero3", "--trainer.devices=2", "--trainer.strategy=tests.cpu_deepspeed.CPUDeepSpeedStrategy",
                "--trainer.strategy.stage=3", "--trainer.strategy.process_group_backend=gloo")
    assert zero3.returncode == 0, zero3.stderr[-3000:]
    fit_here(PRESET, tmp_path / "single", *on_cpu(tmp_path / "single", "--trainer.devices=1", "--trainer.strategy=auto",
                                                   "--data.batch_size=4"))
    record = torch.load(tmp_path / "zero3" / "record.pt", weights_only=True)
    reference = torch.load(tmp_path / "single" / "record.pt", weights_only=True)
    pretrained = load_file(f"{TINY_QWEN}/model.safetensors")
    for name, tensor in record["start"].items():  # loaded into the partitions, not initialised at random
        torch.testing.assert_close(tensor, pretrained.get(name, pretrained["model.embed_tokens.weight"]), rtol=0, atol=0)
    assert record["inv_freq"] == "torch.float32"
    # 4 micro-batches of accumulation per step: Lightning and DeepSpeed would each divide by 4 (16 in all).
    assert len(record["steps"]) == len(reference["steps"]) == 2
    assert_same_gradients(record["steps"], reference["steps"])
    assert record["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    assert (tmp_path / "zero3" / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors").is_file()
    # Written beside its name and renamed (nothing left beside it), and read back in memory equal to what Lightning's
    # converter writes to a file of the whole float32 model.
    checkpoints = tmp_path / "zero3" / "lightning_logs" / "version_0" / "checkpoints"
    ckpt = checkpoints / "last.ckpt"
    assert not list(checkpoints.glob(".*"))
    convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), str(tmp_path / "converted.pt"))
    converted = torch.load(tmp_path / "converted.pt", weights_only=False)["state_dict"]
    ours = load_trained_module(ckpt).state_dict()
    assert ours.keys() == converted.keys()
    for name, tensor in converted.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_deepspeed_presets_offload_with_deepspeeds_adam_and_skip_nonfinite_steps_where_they_can(preset):
    raw = yaml.safe_load(preset.read_text())["trainer"]["strategy"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    config = deepspeed_config(parser.instantiate_classes(parser.parse_object({"strategy": raw})).strategy)
    big = "70b" in preset.name or "72b" in preset.name
    assert offloads_optimizer(config) == big  # DeepSpeedModel.optimizer then builds DeepSpeedCPUAdam
    config["bf16"] = {"enabled": True}  # as Lightning's bf16-mixed formatting sets it
    assert skips_nonfinite_steps(config) == (config["zero_optimization"]["stage"] < 3)


def test_gradients_are_reduced_in_float32_unless_the_config_says_otherwise():
    assert DeepSpeedStrategy(stage=3).config["communication_data_type"] == "fp32"
    own = {"zero_optimization": {"stage": 2}, "communication_data_type": "bf16"}
    assert DeepSpeedStrategy(config=own).config["communication_data_type"] == "bf16"


def test_nonfinite_skipping_follows_deepspeeds_own_overflow_check():
    zero = lambda stage, **precision: {"zero_optimization": {"stage": stage}, **precision}  # noqa: E731
    assert skips_nonfinite_steps(zero(2, bf16={"enabled": True}))
    assert not skips_nonfinite_steps(zero(2, bf16={"enabled": True, "check_grad_overflow": False}))
    assert not skips_nonfinite_steps(zero(3, bf16={"enabled": True}))  # ZeRO-3 checks fp16 only: the run stops
    assert skips_nonfinite_steps(zero(3, fp16={"enabled": True}))
    assert not skips_nonfinite_steps(zero(2))  # fp32


ZERO3_BF16_LOAD = """
import json, os, sys
import torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from sft_lightning.zero import float32_rotary_buffers, zero3_loading
import deepspeed
from transformers import AutoModelForCausalLM
deepspeed.init_distributed("gloo")
reference = AutoModelForCausalLM.from_pretrained(sys.argv[1])  # before the ZeRO-3 config exists: a plain model
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
keep = zero3_loading(config)
with deepspeed.zero.Init(config_dict_or_path=config):  # as Lightning's model_sharded_context
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
before = str(model.model.rotary_emb.inv_freq.dtype)
rebuilt = float32_rotary_buffers(model)
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    loaded = all(torch.equal(p, r.to(p.dtype)) for p, r in zip(model.parameters(), reference.parameters()))
print(json.dumps({"before": before, "rebuilt": rebuilt, "loaded": loaded,
                  "exact": torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)}))
"""


def test_zero3_bf16_loads_pretrained_partitions_and_rebuilds_rope_in_float32():
    # In its own process: deepspeed.init_distributed would leave a process group behind in this one.
    result = subprocess.run([sys.executable, "-c", ZERO3_BF16_LOAD, TINY_QWEN, "29541"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["before"] == "torch.bfloat16"  # what zero.Init makes of it
    assert record == {"before": "torch.bfloat16", "rebuilt": 1, "loaded": True, "exact": True}


def test_evaluating_a_zero3_checkpoint_is_refused_with_the_way_round(tmp_path, capsys, monkeypatch):
    # DeepSpeed 0.19.8 loads ZeRO-3 weights only through an optimizer, which validate/test/predict do not build.
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exited:
        cli_main(["predict", "--config", f"configs/{PRESET}", "--trainer.accelerator=cpu", "--trainer.devices=1",
                  "--trainer.precision=32-true", "--trainer.strategy=tests.cpu_deepspeed.CPUDeepSpeedStrategy",
                  "--trainer.strategy.stage=3", f"--model.model_name_or_path={TINY_QWEN}", f"--ckpt_path={tmp_path}",
                  f"--data.predict_path={ROOT / 'data' / 'chatml_val.json'}", f"--output_path={tmp_path / 'out.jsonl'}"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "cannot load a ZeRO-3 checkpoint to evaluate or predict" in error[0]
    assert f"sft-lightning export --ckpt_path {tmp_path}" in error[0] and not (tmp_path / "out.jsonl").exists()
