"""Scale: the memory planner against the usual accounting, the presets' stated memory, sharded-checkpoint export."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_file

from sft_lightning.adapters import LoRA
from sft_lightning.cli import cli_main
from sft_lightning.checkpoint_loading import load_trained_module
from sft_lightning.memory import SHARDINGS, count_parameters, model_config, plan_memory, plan_of_config, sharding_of
from sft_lightning.module import SFTLitModule
from tests.conftest import ROOT, TINY_QWEN

LLAMA_8B = "meta-llama/Meta-Llama-3-8B-Instruct"
PRESETS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "tiny.yaml")


def test_parameter_counts_match_the_published_sizes():
    published = {"Qwen/Qwen2.5-0.5B-Instruct": 0.49, "Qwen/Qwen2.5-7B-Instruct": 7.62, "Qwen/Qwen2.5-72B-Instruct": 72.7,
                 LLAMA_8B: 8.03, "meta-llama/Meta-Llama-3-70B-Instruct": 70.55, "Qwen/Qwen3-8B": 8.19, "Qwen/Qwen3-32B": 32.76,
                 "Qwen/Qwen3-30B-A3B": 30.53, "meta-llama/Llama-3.1-8B-Instruct": 8.03,
                 "meta-llama/Llama-3.3-70B-Instruct": 70.55,
                 # Gemma 3's report: the language model (embedding + non-embedding), without the 417M vision encoder
                 "google/gemma-3-12b-it": 1.012 + 10.759, "google/gemma-3-27b-it": 1.416 + 25.600}
    for name, billions in published.items():
        plan = plan_memory(model_config(name), 1, SHARDINGS["ddp"])
        assert plan.parameters / 1e9 == pytest.approx(billions, abs=0.01), name
    # Qwen3-30B-A3B: 3.3B of its 30.5B parameters per token (8 of 128 experts)
    assert plan_memory(model_config("Qwen/Qwen3-30B-A3B"), 1, SHARDINGS["ddp"]).active / 1e9 == pytest.approx(3.35, abs=0.01)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_mixed_precision_adamw_is_16_bytes_per_parameter_sharded_as_zero_says(gpus):
    config = model_config(LLAMA_8B)
    n = plan_memory(config, 1, SHARDINGS["ddp"]).parameters
    ddp = plan_memory(config, gpus, SHARDINGS["ddp"])
    assert ddp.state == 16 * n  # 4 float32 weights + 4 gradients + 8 AdamW moments, replicated
    assert plan_memory(config, gpus, SHARDINGS["zero1"]).state == pytest.approx(8 * n + 8 * n / gpus)
    assert plan_memory(config, gpus, SHARDINGS["zero2"]).state == pytest.approx(4 * n + 12 * n / gpus)
    assert plan_memory(config, gpus, SHARDINGS["zero3"]).state == pytest.approx(16 * n / gpus)
    # ZeRO paper, table 1: a 7.5B model on 64 GPUs holds 120 GB of model states, 1.9 GB per GPU under ZeRO-3.
    per_parameter = plan_memory(config, 64, SHARDINGS["zero3"]).state / n
    assert 7.5e9 * 64 * per_parameter / 1e9 == pytest.approx(120) and 7.5e9 * per_parameter / 1e9 == pytest.approx(1.875)


def test_lora_and_qlora_keep_the_base_frozen():
    config = model_config(LLAMA_8B)
    lora = plan_memory(config, 1, SHARDINGS["ddp"], weight_bytes=2.0, lora=LoRA(r=16))
    # r 16 on every linear layer of Llama-3-8B: 32 layers x 16 x (sum of in+out features) = 41.9M adapters
    assert lora.trainable == 41_943_040
    base = lora.parameters - lora.trainable
    assert lora.weights == pytest.approx(2 * base + 2 * lora.trainable)
    assert lora.gradients + lora.optimizer == pytest.approx((2 + 8) * lora.trainable)
    qlora = plan_memory(config, 1, SHARDINGS["ddp"], weight_bytes=2.0, lora=LoRA(r=16), quantization="4bit")
    assert qlora.weights == pytest.approx(0.5 * base + 2 * lora.trainable)


def test_activation_checkpointing_keeps_one_layer_input_each():
    config = model_config(LLAMA_8B)
    plan = plan_memory(config, 8, SHARDINGS["zero3"], tokens_per_gpu=8192, checkpointing=True)
    assert plan.activations_with_checkpointing < plan.activations_without_checkpointing / 10
    assert plan.activations == plan.activations_with_checkpointing


def test_sequence_parallelism_divides_the_activations_and_logits_as_the_formula_says():
    # Llama 3.1 8B at 128k tokens, bf16 activations (2 bytes): with checkpointing each of the 32 layers keeps its input
    # (T/N x 4096 values) plus one layer recomputed (T/N x (10 h + 5 i + 4 kv)); the LM head one chunk of 512 positions.
    config = model_config("meta-llama/Llama-3.1-8B-Instruct")
    tokens, h, i, kv, layers = 131072, 4096, 14336, 8 * 128, 32
    for size in (1, 2, 4, 8):
        plan = plan_memory(config, 8, SHARDINGS["zero3"], tokens_per_gpu=tokens, checkpointing=True, sequence_parallel=size)
        t = tokens / size
        assert plan.activations_with_checkpointing == t * h * layers * 2 + t * (10 * h + 5 * i + 4 * kv) * 2
        assert plan.activations_without_checkpointing == t * (10 * h + 5 * i + 4 * kv) * 2 * layers
        assert plan.logits == 512 * config.vocab_size * (2 + 4 + 4)  # chunked: as many positions whatever the slice
        assert plan.state == plan_memory(config, 8, SHARDINGS["zero3"]).state  # the weights are sharded over all 8
    # 125 GB without it; the estimate names 4, the smallest size that fits an 80 GB GPU (75 GB), as the preset uses.
    assert plan_of_config(str(ROOT / "configs" / "llama3.1-8b-128k.yaml"), sequence_parallel=1)[0].total / 2**30 > 120


def test_estimate_names_the_sequence_parallel_size_that_fits(tmp_path, capsys):
    long = (ROOT / "configs" / "llama3.1-8b-128k.yaml").read_text().replace("      sequence_parallel_size: 4\n", "")
    (tmp_path / "long.yaml").write_text(long)
    cli_main(["estimate", "--config", str(tmp_path / "long.yaml")])
    report = capsys.readouterr().out
    assert "does NOT fit a 80 GB GPU" in report
    assert "with --trainer.strategy.sequence_parallel_size 4: 75.3 GB per GPU, fits (2 data-parallel x 4 sequence-parallel)" in report
    cli_main(["estimate", "--config", str(tmp_path / "long.yaml"), "--gpu_memory_gb", "40"])
    assert "no sequence_parallel_size (2, 4, 8) makes it fit" in capsys.readouterr().out


def test_data_check_says_whether_max_length_fits_the_configs_gpus():
    from sft_lightning.data_check import memory_check

    preset = (ROOT / "configs" / "llama3.1-8b-128k.yaml").read_text()
    assert memory_check(preset) == ("memory per GPU at max_length", "pass", "75.3 GB planned per GPU on 8 GPUs x sequence "
                                    "parallel 4 (ZeRO-3 / FSDP FULL_SHARD): fits 80 GB")
    name, status, detail = memory_check(preset.replace("      sequence_parallel_size: 4\n", ""))
    assert status == "warn" and detail == ("125.2 GB planned per GPU on 8 GPUs (ZeRO-3 / FSDP FULL_SHARD): more than 80 GB; "
                                           "with --trainer.strategy.sequence_parallel_size 4: 75.3 GB per GPU, fits "
                                           "(2 data-parallel x 4 sequence-parallel)")


def test_strategies_are_read_from_configs():
    assert sharding_of("ddp") == SHARDINGS["ddp"]
    assert sharding_of("deepspeed_stage_2").name == "DeepSpeed ZeRO-2"
    offload = sharding_of("deepspeed_stage_3_offload")
    assert offload.offload_optimizer and offload.offload_weights
    fsdp = yaml.safe_load((ROOT / "configs" / "llama3-8b.yaml").read_text())["trainer"]["strategy"]
    assert sharding_of(fsdp) == SHARDINGS["zero3"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_header_states_the_planned_memory_and_it_fits(preset, capsys):
    header = preset.read_text().split("\nseed_everything")[0]
    stated = float(re.search(r"expected memory per GPU: ~(\d+) GB", header).group(1))
    cli_main(["estimate", "--config", str(preset)])
    report = capsys.readouterr().out
    planned = float(re.search(r"total per GPU \(\w+ checkpointing\)\s+([\d.]+) GB", report).group(1))
    assert stated == pytest.approx(planned, abs=1)
    assert "fits a 80 GB GPU" in report


def write_sharded_checkpoint(module: SFTLitModule, folder) -> None:
    """The layout FSDP2Strategy (Lightning's ModelParallelStrategy) writes: torch.distributed.checkpoint shards of
    {"state_dict": ..., "optimizer_0": ...} and the rest in meta.pt. Written here by one process."""
    dcp.save({"state_dict": module.state_dict(), "optimizer_0": {"state": {"0": torch.ones(3)}}}, checkpoint_id=folder)
    torch.save({"hyper_parameters": dict(module.hparams), "global_step": 100}, folder / "meta.pt")


def test_fsdp_sharded_checkpoint_exports_to_one_folder(tmp_path):
    module = SFTLitModule(TINY_QWEN)
    module.configure_model()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.01)  # weights that differ from the pretrained folder
    folder = tmp_path / "step100.ckpt"
    write_sharded_checkpoint(module, folder)
    restored = load_trained_module(folder)
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], tensor, rtol=0, atol=0)
    cli_main(["export", f"--ckpt_path={folder}", f"--output_dir={tmp_path / 'hf'}"])
    assert (tmp_path / "hf" / "model.safetensors").is_file()


# The process's peak resident memory (VmHWM: of this address space, where ru_maxrss would carry over the parent's).
EXPORT_PEAK = """
import json, re, sys
from sft_lightning.export import export
from transformers import AutoTokenizer  # imported before the baseline, as export imports it
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
baseline = peak()
export(sys.argv[1], sys.argv[2])
print(json.dumps({"baseline_kib": baseline, "peak_kib": peak()}))
"""


def test_export_of_a_sharded_checkpoint_holds_about_one_copy_of_the_weights(tmp_path):
    # A model of 185 MB in float32 (46M parameters), whose config says bfloat16, as Qwen2.5's and Llama 3's do.
    folder = tmp_path / "model"
    shutil.copytree(TINY_QWEN, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, dtype="bfloat16", layer_types=["full_attention"] * 8)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()  # nothing to read: the checkpoint holds the weights
    module = SFTLitModule(str(folder))
    module.build(pretrained=False)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.02)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    assert weight_bytes > 150e6
    write_sharded_checkpoint(module, tmp_path / "last.ckpt")
    del module
    result = subprocess.run([sys.executable, "-c", EXPORT_PEAK, str(tmp_path / "last.ckpt"), str(tmp_path / "hf")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    extra = (rss["peak_kib"] - rss["baseline_kib"]) * 1024
    print(f"export: peak RSS {extra / 1e6:.0f} MB above the imports, for {weight_bytes / 1e6:.0f} MB of float32 weights")
    assert extra < 1.5 * weight_bytes
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert {tensor.dtype for tensor in exported.values()} == {torch.bfloat16}  # the model's own dtype by default


ESTIMATOR_PRESETS = ["qwen2.5-7b", "qwen2.5-7b-deepspeed", "llama3-8b", "llama3-8b-deepspeed", "qwen2.5-72b",
                     "qwen2.5-72b-deepspeed", "llama3-70b", "llama3-70b-deepspeed"]


@pytest.mark.parametrize("preset", ESTIMATOR_PRESETS)
def test_model_states_within_10_percent_of_deepspeeds_estimator(preset):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    path = ROOT / "configs" / f"{preset}.yaml"
    plan, name, _ = plan_of_config(str(path))
    trainer = yaml.safe_load(path.read_text())["trainer"]
    counts = count_parameters(model_config(name))
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        counts.total, counts.largest_module, num_gpus_per_node=trainer["devices"], num_nodes=trainer.get("num_nodes", 1),
        cpu_offload=plan.sharding.offload_optimizer, cpu_offload_params=plan.sharding.offload_weights,
    )
    assert plan.model_states == pytest.approx(gpu, rel=0.10)
    if plan.sharding.offload_optimizer:  # the host RAM per node that offloading needs, as DeepSpeed counts it
        assert plan.host_per_node == pytest.approx(cpu, rel=0.10)
