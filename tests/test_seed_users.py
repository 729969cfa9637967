"""The seed trainer's users: its Python workflow (ChatMLDataProcessor, get_config, a training entry point), its
flags answered with ours, and the rough edges a newcomer hits, each a one-line error with exit status 2."""

import subprocess
import sys

import pytest

from sft_lightning.api import ChatMLDataProcessor, get_config, train
from sft_lightning.cli import cli_main
from sft_lightning.errors import ConfigError, DataError
from tests.conftest import ROOT, TINY_QWEN


def test_chatml_data_processor_round_trips_chinese(tmp_path):
    processor = ChatMLDataProcessor()
    samples = [processor.create_chatml_sample("你是一个有用的AI助手。", "什么是机器学习？", "机器学习是人工智能的一个分支。"),
               processor.create_chatml_sample(None, "你好！", "你好！有什么可以帮你的吗？")]
    path = processor.save_chatml_data(samples, tmp_path / "zh.json")
    assert "机器学习是人工智能的一个分支。" in path.read_text(encoding="utf-8")  # readable, not \u escapes
    assert processor.load_chatml_data(path) == samples
    with pytest.raises(DataError, match="sample 1: message 2: unknown role"):
        processor.save_chatml_data([{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}],
                                   tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_get_config_is_what_fit_runs_and_train_takes_it_back(tmp_path, monkeypatch):
    preset = get_config("qwen2.5-0.5b")  # a GPU preset parses on a CPU: nothing is instantiated
    assert preset["model"]["model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert preset["trainer"]["precision"] == "bf16-mixed" and preset["data"]["batch_size"] == 4
    assert preset["model"]["weight_decay"] is not None and "early_stopping" in preset  # defaults filled in
    with pytest.raises(ConfigError, match="'qwen9' is not a preset; presets: .*tiny"):
        get_config("qwen9")
    monkeypatch.chdir(ROOT)
    config = get_config("tiny")
    config["trainer"].update(default_root_dir=str(tmp_path), max_epochs=1, limit_train_batches=4, limit_val_batches=1,
                             enable_progress_bar=False)
    config["data"].update(cache_dir=str(tmp_path / "cache"), train_path="data/chatml_zh.json", val_path="data/chatml_zh_val.json")
    result = train(config, {"model.learning_rate": 1e-3})
    assert result.checkpoint.is_file() and (result.hf_model / "model.safetensors").is_file()
    assert result.log_dir == tmp_path / "lightning_logs" / "version_0"
    saved = (result.log_dir / "config.yaml").read_text(encoding="utf-8")
    assert "learning_rate: 0.001" in saved and "chatml_zh.json" in saved


def one_line_error(capsys, args, exit_code=2) -> str:
    with pytest.raises(SystemExit) as exited:
        cli_main(args)
    err = capsys.readouterr().err
    assert exited.value.code == exit_code and "Traceback" not in err
    return err.strip()


def test_a_folder_that_is_not_a_model_and_a_missing_local_path(tmp_path, capsys, monkeypatch):
    run = tmp_path / "outputs" / "sft_model"
    (run / "lightning_logs" / "version_0" / "hf_model").mkdir(parents=True)
    (run / "lightning_logs" / "version_0" / "hf_model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["chat", "--model_path", "outputs/sft_model"])
    # Paths as the user gave them (relative to where the command runs).
    assert err == ("sft-lightning: error: outputs/sft_model: not a Hugging Face tokenizer folder (it has no "
                   "tokenizer.json or tokenizer_config.json or tokenizer.model or vocab.json); the newest exported "
                   "model under it is outputs/sft_model/lightning_logs/version_0/hf_model")
    # A path under an existing folder is never looked up on the hub.
    assert one_line_error(capsys, ["chat", "--model_path", "outputs/nothere"]) == (
        "sft-lightning: error: outputs/nothere: no such tokenizer folder")


def test_an_unreachable_hub_fails_fast_naming_hf_hub_offline(capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    import sft_lightning.errors as errors
    errors._hub_reachable.cache_clear()
    err = one_line_error(capsys, ["chat", "--model_path", "someorg/nothere"])
    assert err == ("sft-lightning: error: someorg/nothere: not a local folder, and the Hugging Face hub cannot be "
                   "reached: give a local folder, or set HF_HUB_OFFLINE=1 to load it from the local hub cache")


def test_newcomer_mistakes_are_one_line(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert one_line_error(capsys, ["fit", "--config", "configs/qwen2.5-0.5b.yaml"]) == (
        "sft-lightning: error: configs/qwen2.5-0.5b.yaml asks for trainer.accelerator=gpu and this machine has no CUDA "
        "GPU: run it on a GPU machine, or add --trainer.accelerator=cpu --trainer.devices=1 --trainer.strategy=auto "
        "--trainer.precision=32-true")
    assert one_line_error(capsys, ["fit", "--model_name", "Qwen/Qwen2.5-0.5B"]) == (
        "sft-lightning: error: --model_name is a flag of the seed trainer; here it is --model.model_name_or_path "
        "(README: From the seed trainer)")
    # A prefix of a real option is not taken for it.
    assert one_line_error(capsys, ["fit", "--config", "configs/tiny.yaml", "--trainer.max_epoch", "1"]) == (
        "sft-lightning: error: unrecognized arguments: --trainer.max_epoch 1 (sft-lightning fit --help lists the options)")
    # Every seed flag of a command at once; a verb's own option of the same name is its own (chat --system_prompt).
    assert one_line_error(capsys, ["fit", "--model_name", "M", "--num_epochs", "3", "--model_name=N"]) == (
        "sft-lightning: error: flags of the seed trainer: --model_name is --model.model_name_or_path here; "
        "--num_epochs is --trainer.max_epochs here (README: From the seed trainer)")
    assert one_line_error(capsys, ["chat", "--model_path", "M", "--system_prompt", "S", "--mode", "chat"]) == (
        "sft-lightning: error: --mode is a flag of the seed trainer; here it is sft-lightning chat (--mode chat) or "
        "sft-lightning predict (--mode batch) (README: From the seed trainer)")
    # A mistyped verb is named, with the closest one.
    assert one_line_error(capsys, ["fitt", "--config", "configs/tiny.yaml"]) == (
        "sft-lightning: error: no verb 'fitt' (did you mean fit?); sft-lightning --help lists them")
    assert one_line_error(capsys, ["--config", "configs/tiny.yaml"]) == (
        "sft-lightning: error: no verb before --config: sft-lightning VERB [options]; sft-lightning --help lists them")


def test_help_lists_every_verb(capsys):
    cli_main(["--help"])
    listed = capsys.readouterr().out
    for verb in ("fit", "validate", "test", "predict", "chat", "export", "estimate", "data sample", "data convert", "data check"):
        assert f"\n  {verb} " in listed
    # The console script answers --help and seed flags before importing Lightning, torch or transformers.
    probe = ("import sys; from sft_lightning.entry import main; sys.argv = ['sft-lightning', '--help']; main(); "
             "print(sorted(m for m in ('lightning', 'torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.splitlines()[-1] == "[]" and "data check" in result.stdout


def test_data_check_takes_model_and_data_overrides(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli_main(["data", "check", "--config", "configs/tiny.yaml", "--data.train_path", "data/chatml_zh.json",
              f"--model.model_name_or_path={TINY_QWEN}", "--samples", "1"])
    out = capsys.readouterr().out
    assert "train: data/chatml_zh.json" in out and "<|im_start|>" in out and "PASS" in out
