"""The GPU presets' precision and strategy, through ``sft-lightning fit`` on this CPU with a tiny model of the same
architecture: every packed forward reaches the strict stand-in of the varlen kernel (tests/strict_kernels.py) with
inputs the real kernel accepts, in bf16. FSDP2 is covered in test_fsdp.py, on 2 ranks."""

import pytest

from tests.conftest import TINY_LLAMA, TINY_QWEN, cli_fit, fit_here
from tests.helpers import IN_CHUNKS
from tests.strict_kernels import strict_calls

pytestmark = pytest.mark.slow


def on_cpu(model: str, kernel_path, *extra: str) -> list[str]:
    """A preset's own precision (bf16-mixed, and its weight dtype) on this CPU, a tiny model, 2 packed steps."""
    return [
        "--trainer.accelerator=cpu", "--trainer.num_nodes=1", f"--model.model_name_or_path={model}",
        IN_CHUNKS,
        "--data.max_length=128", "--data.num_workers=0", "--trainer.max_steps=2", "--trainer.val_check_interval=1.0",
        "--data.val_path=null", "--trainer.callbacks+=tests.strict_kernels.StrictVarlen",
        f"--trainer.callbacks.path={kernel_path}", *extra,
    ]


@pytest.mark.parametrize("preset, model, extra", [
    ("qwen2.5-0.5b.yaml", TINY_QWEN, []),  # DDP preset, float32 weights under bf16 autocast: the crash of issue 22
    ("qwen2.5-1.5b.yaml", TINY_QWEN, []),  # with activation checkpointing: the kernel runs again in backward
    ("llama3-8b-lora.yaml", TINY_LLAMA, []),  # bfloat16 base weights, LoRA adapters
    ("llama3-8b-qlora.yaml", TINY_LLAMA, ["--model.quantization=null"]),  # bitsandbytes is CUDA only: its bf16 LoRA
], ids=["qwen2.5-0.5b", "qwen2.5-1.5b", "llama3-8b-lora", "llama3-8b-qlora"])
def test_single_device_presets_reach_the_kernel_in_bf16(preset, model, extra, tmp_path):
    fit_here(preset, tmp_path, *on_cpu(model, tmp_path / "kernel", "--trainer.devices=1", "--trainer.strategy=auto", *extra))
    (calls,) = strict_calls(tmp_path / "kernel")
    assert set(calls) == {"torch.bfloat16"} and calls["torch.bfloat16"] >= 2 * 2  # 2 layers x 2 steps at least


@pytest.mark.parametrize("preset, stage", [("qwen2.5-7b-deepspeed.yaml", 3), ("qwen2.5-1.5b-deepspeed.yaml", 2)],
                         ids=["zero3", "zero2"])
def test_deepspeed_presets_reach_the_kernel_in_bf16_on_two_ranks(preset, stage, tmp_path):
    result = cli_fit(preset, tmp_path, *on_cpu(
        TINY_QWEN, tmp_path / "kernel", "--trainer.devices=2", "--trainer.strategy=tests.cpu_deepspeed.CPUDeepSpeedStrategy",
        f"--trainer.strategy.stage={stage}", "--trainer.strategy.process_group_backend=gloo",
    ))
    assert result.returncode == 0, result.stderr[-3000:]
    for calls in strict_calls(tmp_path / "kernel", ranks=2):
        assert set(calls) == {"torch.bfloat16"} and calls["torch.bfloat16"] >= 2 * 2
