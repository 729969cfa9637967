"""The shipped FSDP2 presets themselves, on 2 CPU processes (gloo) through ``sft-lightning fit``: the pretrained
weights are read by rank 0 only, checkpoints are sharded folders, a run killed mid-way resumes exactly with
``--ckpt_path last``, and the exported weights equal those of one process with twice the micro-batch."""

import json
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import sft_lightning.language_model as language_model_py
from sft_lightning.cli import cli_main
from tests.conftest import ROOT, TINY_LLAMA, TINY_QWEN, cli_fit, fit_here
from tests.helpers import IN_CHUNKS, logged_scalars
from tests.strict_kernels import strict_calls

pytestmark = pytest.mark.slow
PRESETS = {"qwen2": ("qwen2.5-7b.yaml", TINY_QWEN), "llama": ("llama3-8b.yaml", TINY_LLAMA)}


class LoadRecorder(L.Callback):
    """Test helper: each rank writes how often it called ``from_pretrained`` while the model was configured, and
    how many parameter elements it holds locally out of the model's total."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loads = 0

    def setup(self, trainer, pl_module, stage) -> None:  # runs before configure_model
        self.original = vars(language_model_py.AutoModelForCausalLM)["from_pretrained"]
        real = language_model_py.AutoModelForCausalLM.from_pretrained

        def counted(*args, **kwargs):
            self.loads += 1
            return real(*args, **kwargs)

        language_model_py.AutoModelForCausalLM.from_pretrained = counted

    def teardown(self, trainer, pl_module, stage) -> None:
        language_model_py.AutoModelForCausalLM.from_pretrained = self.original  # nothing stays patched

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


class ReductionCounter(L.Callback):
    """Test helper: each rank writes how many gradient reduce-scatters FSDP2 ran before each optimizer step."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.per_step, self.calls = [], 0

    def setup(self, trainer, pl_module, stage) -> None:
        # Test-only: FSDP2 reduces every FSDP unit's gradients through this function (torch 2.13).
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group

        self.module, self.original = _fsdp_param_group, _fsdp_param_group.foreach_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        _fsdp_param_group.foreach_reduce = counted

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.per_step.append(self.calls)
        self.calls = 0

    def teardown(self, trainer, pl_module, stage) -> None:
        self.module.foreach_reduce = self.original
        with open(f"{self.path}.{trainer.global_rank}", "w") as file:
            json.dump(self.per_step, file)


def on_cpu(model: str, *extra: str) -> list[str]:
    """Options that run a shipped preset on this CPU with a tiny model of the same architecture and the repo's
    small data."""
    return [
        "--trainer.accelerator=cpu", "--trainer.num_nodes=1", "--trainer.precision=32-true",
        IN_CHUNKS,
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
    # Llama reduce-scatters after every micro-batch, Qwen once per optimizer step (the default): both equal one process.
    reduce = ["--trainer.strategy.reduce_every_micro_batch=true"] if arch == "llama" else []
    sharded = tmp_path / "fsdp"
    killed = fit(preset, model, sharded, "--trainer.devices=2", *reduce, "--trainer.callbacks+=tests.helpers.KillAtStep",
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

    resumed = fit(preset, model, sharded, "--trainer.devices=2", *reduce, "--ckpt_path=last",
                  "--trainer.callbacks+=tests.test_fsdp.LoadRecorder", f"--trainer.callbacks.path={tmp_path / 'resumed'}",
                  "--trainer.callbacks+=tests.test_fsdp.ReductionCounter", f"--trainer.callbacks.path={tmp_path / 'reduce'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--ckpt_path last: resuming from" in resumed.stdout + resumed.stderr
    # Weights from the checkpoint: the pretrained ones are never read, and RoPE's buffer is computed all the same.
    resumed_ranks = [json.loads((tmp_path / f"resumed.{rank}").read_text()) for rank in (0, 1)]
    assert [r["loads"] for r in resumed_ranks] == [0, 0] and all(r["inv_freq"] == "torch.float32" for r in resumed_ranks)
    # 3 FSDP units (2 decoder layers and the root), accumulation 4: one reduction each per optimizer step by default.
    reductions = [json.loads((tmp_path / f"reduce.{rank}").read_text()) for rank in (0, 1)]
    assert reductions[0] == reductions[1] and set(reductions[0]) == {3 * (4 if reduce else 1)}
    assert len(reductions[0]) == 10  # from last.ckpt of step 10 to step 20
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
    # Evaluation while training at the end: each sharded rank answered its share, every forward synced; the answers
    # are one process's.
    answers = [[json.loads(line)["answer"] for line in (run / "generations" / "step000020.jsonl").read_text().splitlines()]
               for run in (sharded / "lightning_logs" / "version_1", single / "lightning_logs" / "version_0")]
    assert len(answers[0]) > 1 and answers[0] == answers[1]
    if arch == "qwen2":
        predict_on_one_and_two_ranks(preset, model, sharded / "lightning_logs" / "version_1", tmp_path)


def predict_on_one_and_two_ranks(preset: str, model: str, run, tmp_path) -> None:
    """The FSDP2 preset's predict from its sharded checkpoint, on 2 ranks and on 1 (both sharded models that gather
    their weights in every forward), and plain predict on the export: the same answers, each prompt once, in order."""
    prompts = tmp_path / "prompts.jsonl"
    records = json.load(open(ROOT / "data" / "chatml_val.json"))[:5]  # 5: one rank gets a repeated prompt
    prompts.write_text("".join(json.dumps(record) + "\n" for record in records))
    options = [f"--data.predict_path={prompts}", "--data.eval_batch_size=1", "--model.max_new_tokens=12"]
    answers = {}
    for devices in (2, 1):
        out = tmp_path / f"predict{devices}.jsonl"
        result = subprocess.run(
            [sys.executable, "-m", "sft_lightning.cli", "predict", "--config", f"configs/{preset}",
             *on_cpu(model, f"--trainer.devices={devices}"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
             *options, f"--output_path={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        answers[devices] = [json.loads(line) for line in out.read_text().splitlines()]
    plain = tmp_path / "plain.jsonl"
    cli_main(["predict", "--config", "configs/tiny.yaml", f"--model.model_name_or_path={run / 'hf_model'}", *options,
              f"--output_path={plain}"])
    answers["plain"] = [json.loads(line) for line in plain.read_text().splitlines()]
    assert [row["messages"] for row in answers[2]] == [record["messages"] for record in records]
    assert answers[2] == answers[1] == answers["plain"]
    assert len({row["prediction"] for row in answers[2]}) > 1  # real, differing answers


def test_fsdp_bf16_keeps_float32_master_shards_buffers_and_decay_groups(tmp_path):
    result = fit("qwen2.5-7b.yaml", TINY_QWEN, tmp_path, "--trainer.devices=2", "--trainer.precision=bf16-mixed",
                 "--trainer.max_steps=2", "--model.weight_decay=0.1", "--trainer.callbacks+=tests.test_fsdp.LoadRecorder",
                 f"--trainer.callbacks.path={tmp_path / 'load'}", "--trainer.callbacks+=tests.strict_kernels.StrictVarlen",
                 f"--trainer.callbacks.path={tmp_path / 'kernel'}")
    assert result.returncode == 0, result.stderr[-3000:]
    # The packed forward reaches the kernel's stand-in in bf16 on every rank (FSDP2 gathers bf16 weights).
    assert all(set(calls) == {"torch.bfloat16"} for calls in strict_calls(tmp_path / "kernel", ranks=2))
    for rank in (0, 1):
        record = json.loads((tmp_path / f"load.{rank}").read_text())
        # Layers compute in bf16 (FSDP2's MixedPrecisionPolicy) from float32 shards; RoPE stays float32.
        assert record["dtypes"] == ["torch.float32"] and record["inv_freq"] == "torch.float32"
        assert record["decayed"] == 2 * 7 + 1  # q, k, v, o, gate, up, down of 2 layers and the (tied) embedding


@pytest.mark.parametrize("arch", ["qwen3.5", "qwen3-moe", "gemma3-vision"])
def test_fsdp_on_two_processes_equals_one_process_for_newer_architectures(arch, tmp_path):
    # Gated DeltaNet layers keep packed samples apart inside their sharded decoder layers, and experts are sharded like
    # any weight: the same update on 2 ranks as on one. Gemma 3 as the hub ships it (an image-text checkpoint, its
    # gemma3-12b/27b presets are FSDP2): rank 0 reads the language model alone, its scaled embedding's buffer reaches
    # every rank, and the sharded run exports the text model. (Its sliding window is attention only: test_architectures.py.)
    model = str(ROOT / "models" / f"tiny-{arch}")
    common = ("--trainer.max_steps=4", "--checkpoint.every_n_train_steps=4", "--model.learning_rate=1e-2")
    sharded = fit("qwen2.5-7b.yaml", model, tmp_path / "fsdp", "--trainer.devices=2", "--trainer.strategy.layer_classes=null",
                  *common)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    fit_here("qwen2.5-7b.yaml", tmp_path / "single", *on_cpu(model, "--trainer.devices=1", "--trainer.strategy=auto",
                                                             "--data.batch_size=4", *common))
    checkpoints = [tmp_path / run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt" for run in ("single", "fsdp")]
    expected, actual = (exported(ckpt, tmp_path / f"hf{i}") for i, ckpt in enumerate(checkpoints))
    # The image-text checkpoint's language model, under the text model's names (its vision tower is never trained).
    initial = {name.removeprefix("language_model."): tensor for name, tensor in load_file(f"{model}/model.safetensors").items()
               if not name.startswith(("vision_tower.", "multi_modal_projector."))}
    assert sorted(initial) == sorted(expected)
    assert max((expected[name] - initial[name]).abs().max().item() for name in initial) > 5e-3  # training moved them
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-4, msg=name)



def long_conversations(source: str, per: int, path) -> str:
    """Conversations of ``per`` of the repo's chats each (system turns left out), written to ``path``: ~800 tokens
    with the tiny tokenizer (mean 807), past the 512 positions the tiny Llama 3.1's RoPE scaling starts from."""
    records = json.load(open(ROOT / "data" / source))
    chats = [[m for m in record["messages"] if m["role"] != "system"] for record in records]
    chats = [chat for chat in chats if chat[0]["role"] == "user"]
    long = [{"messages": [m for chat in chats[i : i + per] for m in chat]} for i in range(0, len(chats) - per + 1, per)]
    path.write_text(json.dumps(long))
    return str(path)


def long_context_on_cpu(tmp_path, devices: int, *extra: str) -> list[str]:
    """A long-context preset on this CPU: the tiny Llama 3.1 (4 heads, 2 key/value heads: sequence parallel 2, where
    the presets' GPUs use 4), held-out conversations of ~800 tokens in rows of up to 2,048, 20 steps."""
    return on_cpu(str(ROOT / "models" / "tiny-llama3.1"), f"--trainer.devices={devices}",
                  f"--data.train_path={long_conversations('chatml_data.json', 24, tmp_path / 'train.json')}",
                  f"--data.val_path={long_conversations('chatml_val.json', 12, tmp_path / 'val.json')}",
                  "--data.max_length=2048", *extra)


def equal_to_one_process(preset: str, tmp_path, batch_size: int) -> None:
    """The sequence-parallel run under ``tmp_path / 'sp'`` (its newest version) against one process with the same
    global batch: the same held-out loss at every validation and the same exported weights."""
    fit_here(preset, tmp_path / "single", *long_context_on_cpu(tmp_path, 1, "--trainer.strategy=auto",
                                                               f"--data.batch_size={batch_size}"))
    runs = [tmp_path / "single" / "lightning_logs" / "version_0",
            max((tmp_path / "sp" / "lightning_logs").glob("version_*"))]
    losses = [logged_scalars(run)["val_loss"] for run in runs]
    assert losses[0] and losses[1] == pytest.approx(losses[0][-len(losses[1]):], abs=1e-5)  # slice by slice
    expected, actual = (exported(run / "checkpoints" / "last.ckpt", tmp_path / f"hf{i}") for i, run in enumerate(runs))
    initial = load_file(ROOT / "models" / "tiny-llama3.1" / "model.safetensors")
    assert max((expected[name] - initial[name]).abs().max().item() for name in initial) > 5e-3  # training moved them
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-4, msg=name)


def test_sequence_parallel_2_on_two_ranks_resumes_after_sigkill_and_equals_one_process(tmp_path):
    # The llama3.1-8b-128k preset as shipped (accumulation 4, checkpointing): each packed row split in two along its
    # length, the halves' attention exchanged by all-to-all; killed at step 12, resumed from its sharded last.ckpt of
    # step 10, the last step of an epoch (7 rows, 2 steps an epoch): with the loader following Lightning's epoch
    # numbers, which run one ahead after such a resume, this run skipped an epoch's order and failed here.
    sequence = ("--trainer.strategy.sequence_parallel_size=2",)
    killed = cli_fit("llama3.1-8b-128k.yaml", tmp_path / "sp", *long_context_on_cpu(
        tmp_path, 2, *sequence, "--trainer.callbacks+=tests.helpers.KillAtStep", "--trainer.callbacks.step=12"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = cli_fit("llama3.1-8b-128k.yaml", tmp_path / "sp", *long_context_on_cpu(tmp_path, 2, *sequence,
                                                                                     "--ckpt_path=last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "run layout: 2 processes = 1 data-parallel x 2 sequence-parallel" in output and "resuming from" in output
    equal_to_one_process("llama3.1-8b-128k.yaml", tmp_path, batch_size=1)


def test_data_parallel_2_x_sequence_parallel_2_on_four_ranks_equals_one_process(tmp_path):
    # The llama3.3-70b-32k preset as shipped (accumulation 2, reduced after every micro-batch) on 4 ranks: groups
    # {0, 1} and {2, 3} take different micro-batches and split each in two.
    result = cli_fit("llama3.3-70b-32k.yaml", tmp_path / "sp", *long_context_on_cpu(
        tmp_path, 4, "--trainer.strategy.sequence_parallel_size=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run layout: 4 processes = 2 data-parallel x 2 sequence-parallel" in result.stdout + result.stderr
    equal_to_one_process("llama3.3-70b-32k.yaml", tmp_path, batch_size=2)
