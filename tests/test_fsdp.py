"""The shipped FSDP2 presets themselves, on 2 CPU processes (gloo) through ``sft-lightning fit``: the pretrained
weights are read by rank 0 only, checkpoints are sharded folders, a run killed mid-way resumes exactly with
``--ckpt_path last``, and the exported weights equal those of one process with twice the micro-batch."""

import json
import signal
import subprocess

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import sft_lightning.module as module_py
from sft_lightning.cli import cli_main
from tests.conftest import TINY_LLAMA, TINY_QWEN, cli_fit, fit_here

pytestmark = pytest.mark.slow
PRESETS = {"qwen2": ("qwen2.5-7b.yaml", TINY_QWEN), "llama": ("llama3-8b.yaml", TINY_LLAMA)}


class LoadRecorder(L.Callback):
    """Test helper: each rank writes how often it called ``from_pretrained`` while the model was configured, and
    how many parameter elements it holds locally out of the model's total."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loads = 0

    def setup(self, trainer, pl_module, stage) -> None:  # runs before configure_model
        self.original = vars(module_py.AutoModelForCausalLM)["from_pretrained"]
        real = module_py.AutoModelForCausalLM.from_pretrained

        def counted(*args, **kwargs):
            self.loads += 1
            return real(*args, **kwargs)

        module_py.AutoModelForCausalLM.from_pretrained = counted

    def teardown(self, trainer, pl_module, stage) -> None:
        module_py.AutoModelForCausalLM.from_pretrained = self.original  # nothing stays patched

    def on_fit_start(self, trainer, pl_module) -> None:
        parameters = list(pl_module.model.parameters())
        record = {
            "loads": self.loads,
            "local": sum(p.to_local().numel() for p in parameters),
            "total": sum(p.numel() for p in parameters),
            "sharded": all(isinstance(p, DTensor) for p in parameters),
            "dtypes": sorted({str(p.dtype) for p in parameters}),
            "inv_freq": str(pl_module.model.model.rotary_emb.inv_freq.dtype),
            "decayed": sum(len(g["params"]) for g in trainer.optimizers[0].param_groups if g["weight_decay"] > 0),
        }
        with open(f"{self.path}.{trainer.global_rank}", "w") as file:
            json.dump(record, file)


def on_cpu(model: str, *extra: str) -> list[str]:
    """Options that run a shipped preset on this CPU with a tiny model of the same architecture and the repo's
    small data."""
    return [
        "--trainer.accelerator=cpu", "--trainer.num_nodes=1", "--trainer.precision=32-true",
        f"--model.model_name_or_path={model}", "--model.learning_rate=1e-3", "--data.max_length=128",
        "--data.num_workers=0", "--trainer.max_steps=20", "--trainer.max_epochs=-1", "--checkpoint.every_n_train_steps=5",
        "--trainer.val_check_interval=1.0",  # the preset's 0.25 would validate (and save) about every step here
        *extra,
    ]


def fit(preset: str, model: str, root, *extra: str) -> subprocess.CompletedProcess:
    return cli_fit(preset, root, *on_cpu(model, *extra))


def exported(ckpt, folder) -> dict[str, torch.Tensor]:
    cli_main(["export", f"--ckpt_path={ckpt}", f"--output_dir={folder}"])
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("arch", PRESETS)
def test_fsdp_preset_on_two_processes_resumes_and_equals_one_process(arch, tmp_path):
    preset, model = PRESETS[arch]
    sharded = tmp_path / "fsdp"
    killed = fit(preset, model, sharded, "--trainer.devices=2", "--trainer.callbacks+=tests.helpers.KillAtStep",
                 "--trainer.callbacks.step=12", "--trainer.callbacks+=tests.test_fsdp.LoadRecorder",
                 f"--trainer.callbacks.path={tmp_path / 'load'}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"load.{rank}").read_text()) for rank in (0, 1)]
    # Rank 0 alone reads the pretrained weights; every rank holds half of them, as shards, float32 buffers.
    assert [r["loads"] for r in ranks] == [1, 0]
    assert all(r["sharded"] and r["inv_freq"] == "torch.float32" for r in ranks)
    assert sum(r["local"] for r in ranks) == ranks[0]["total"] and max(r["local"] for r in ranks) < 0.55 * ranks[0]["total"]
    checkpoint = sharded / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert {p.name for p in checkpoint.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", "meta.pt"}

    resumed = fit(preset, model, sharded, "--trainer.devices=2", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--ckpt_path last: resuming from" in resumed.stdout + resumed.stderr
    assert (sharded / "lightning_logs" / "version_1" / "hf_model" / "model.safetensors").is_file()  # fit's own export

    single = tmp_path / "single"
    fit_here(preset, single, *on_cpu(model, "--trainer.devices=1", "--trainer.strategy=auto", "--data.batch_size=4"))
    expected = exported(single / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", tmp_path / "single_hf")
    actual = exported(sharded / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt", tmp_path / "fsdp_hf")
    initial = load_file(f"{model}/model.safetensors")
    assert actual.keys() == expected.keys()
    moved = max((expected[name] - initial[name]).abs().max().item() for name in initial)
    assert moved > 5e-3  # training moved the weights far beyond the tolerance below (seen: 1.0e-2 moved, 4e-7 apart)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-4, msg=name)


def test_fsdp_bf16_keeps_float32_master_shards_buffers_and_decay_groups(tmp_path):
    result = fit("qwen2.5-7b.yaml", TINY_QWEN, tmp_path, "--trainer.devices=2", "--trainer.precision=bf16-mixed",
                 "--trainer.max_steps=2", "--model.weight_decay=0.1", "--trainer.callbacks+=tests.test_fsdp.LoadRecorder",
                 f"--trainer.callbacks.path={tmp_path / 'load'}")
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"load.{rank}").read_text())
        # Layers compute in bf16 (FSDP2's MixedPrecisionPolicy) from float32 shards; RoPE stays float32.
        assert record["dtypes"] == ["torch.float32"] and record["inv_freq"] == "torch.float32"
        assert record["decayed"] == 2 * 7 + 1  # q, k, v, o, gate, up, down of 2 layers and the (tied) embedding
