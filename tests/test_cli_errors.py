"""The bad-input catalogue: each ends the command with one clear line naming the file, the 1-based line or
record and what is wrong; exit status 2, no traceback, and nothing written (no checkpoint, export, log folder)."""

import json
import logging
import shutil
import subprocess
import sys

import pytest

from sft_lightning.cli import cli_main
from tests.conftest import ROOT, TINY_QWEN

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def jsonl(*rows) -> bytes:
    return "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows).encode()


def messages(*pairs) -> dict:
    return {"messages": [dict(zip(("role", "content"), pair)) if isinstance(pair, tuple) else pair for pair in pairs]}


# (file name, bytes, expected message after "<file>: ")
BAD_FILES = {
    "not JSON": ("train.json", b'[{"messages": [}]', "line 1: not valid JSON"),
    "broken JSONL line": ("train.jsonl", jsonl(GOOD, '{"messages": ['), "line 2: not valid JSON"),
    "unknown role": ("train.jsonl", jsonl(GOOD, messages(("robot", "x"))), "line 2: message 1: unknown role 'robot'"),
    "missing content": ("train.jsonl", jsonl(GOOD, messages({"role": "user"})), "line 2: message 1: content is missing"),
    "empty content": ("train.jsonl", jsonl(GOOD, messages(("user", ""), ("assistant", "x"))), "line 2: message 1: user content is empty"),
    "non-string content": ("train.jsonl", jsonl(GOOD, messages(("user", 5))), "line 2: message 1: content is a int, not a string"),
    "empty messages": ("train.jsonl", jsonl(GOOD, {"messages": []}), "line 2: 'messages' must be a non-empty list"),
    "no assistant turn": ("train.jsonl", jsonl(GOOD, messages(("user", "hi"))), "line 2: no assistant turn to train on"),
    "no messages key": ("train.jsonl", jsonl(GOOD, {"prompt": "hi", "answer": "x"}), "line 2: no 'messages' key (keys: prompt, answer)"),
    "empty file": ("train.jsonl", b"", "the file is empty"),
    "array with a non-object": ("train.json", json.dumps([GOOD, [1, 2]]).encode(), "record 2: expected an object with 'messages', got list"),
    "undecodable bytes": ("train.jsonl", jsonl(GOOD) + b"\n\xff\xfe\n", "line 2: not valid UTF-8"),
}


def run(tmp_path, capsys, monkeypatch, *extra):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'out'}",
                  f"--data.cache_dir={tmp_path / 'cache'}", *extra])
    return exit_info.value.code, capsys.readouterr().err


def assert_one_clear_line(tmp_path, code, err, expected):
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"sft-lightning: error: {expected}"), err
    assert not (tmp_path / "out").exists()  # no log folder, config, checkpoint or export


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_training_file(tmp_path, capsys, monkeypatch, case):
    name, content, message = BAD_FILES[case]
    data = tmp_path / name
    data.write_bytes(content)
    code, err = run(tmp_path, capsys, monkeypatch, f"--data.train_path={data}")
    assert_one_clear_line(tmp_path, code, err, f"{data}: {message}")


def test_missing_file(tmp_path, capsys, monkeypatch):
    code, err = run(tmp_path, capsys, monkeypatch, f"--data.val_path={tmp_path / 'val.jsonl'}")
    assert_one_clear_line(tmp_path, code, err, f"{tmp_path / 'val.jsonl'}: no such file")


def test_missing_model_path(tmp_path, capsys, monkeypatch):
    code, err = run(tmp_path, capsys, monkeypatch, f"--model.model_name_or_path={tmp_path / 'nope'}")
    assert_one_clear_line(tmp_path, code, err, f"{tmp_path / 'nope'}: no such model folder")


def test_template_that_cannot_render(tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(TINY_QWEN, model)
    (model / "chat_template.jinja").write_text("{{ raise_exception('this model has no chat format') }}")
    code, err = run(tmp_path, capsys, monkeypatch, f"--model.model_name_or_path={model}")
    assert_one_clear_line(tmp_path, code, err,
                          "data/chatml_data.json: record 1: the chat template failed to render: this model has no chat format")


def test_max_length_beyond_the_model_positions(tmp_path, capsys, monkeypatch):
    code, err = run(tmp_path, capsys, monkeypatch, "--data.max_length=4096")
    assert_one_clear_line(tmp_path, code, err, "data.max_length=4096 is more than the 2048 positions of models/tiny-qwen2")  # the path as the config gives it


@pytest.mark.parametrize("option, expected", [
    ("--data.batch_size=0", "data.batch_size=0: must be at least 1"),  # was range()'s "arg 3 must not be zero"
    ("--data.batch_size=-4", "data.batch_size=-4: must be at least 1"),  # was a ZeroDivisionError
    ("--data.max_length=0", "data.max_length=0: must be at least 1"),
    ("--model.learning_rate=-1", "model.learning_rate=-1.0: must be more than 0"),
    ("--model.warmup_ratio=1.5", "model.warmup_ratio=1.5: must be at most 1"),
])
def test_a_setting_out_of_its_range_is_one_line(tmp_path, capsys, monkeypatch, option, expected):
    code, err = run(tmp_path, capsys, monkeypatch, option)
    assert_one_clear_line(tmp_path, code, err, expected)


def test_a_model_folder_whose_config_has_no_model_type_is_one_line(tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(TINY_QWEN, model)
    config = json.loads((model / "config.json").read_text())
    del config["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    code, err = run(tmp_path, capsys, monkeypatch, f"--model.model_name_or_path={model}")
    assert_one_clear_line(tmp_path, code, err, f"model {str(model)!r} cannot be loaded: Unrecognized model in {model}")


@pytest.mark.parametrize("verb", ["validate", "test", "predict"])
def test_evaluating_the_last_checkpoint_of_a_run_that_has_none_refuses(tmp_path, capsys, monkeypatch, verb):
    # A mistyped trainer.default_root_dir: never scores the untrained model with exit 0 (fit starts a new run).
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        cli_main([verb, "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'out'}",
                  f"--data.cache_dir={tmp_path / 'cache'}", "--data.test_path=data/chatml_val.json",
                  "--data.predict_path=data/chatml_val.json", "--ckpt_path=last",
                  *([f"--output_path={tmp_path / 'out.jsonl'}"] if verb == "predict" else [])])
    assert_one_clear_line(tmp_path, exit_info.value.code, capsys.readouterr().err,
                          f"--ckpt_path last: no checkpoint under {tmp_path / 'out'}: {verb} would use the untrained model")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("option", ["--data.max_lenght=5", "--data.batch_size=eight"])
def test_unknown_key_or_wrong_type_keeps_jsonargparse_message(tmp_path, capsys, monkeypatch, option):
    code, err = run(tmp_path, capsys, monkeypatch, option)
    assert code == 2 and "Traceback" not in err
    assert "error:" in err and option.split("=")[0].removeprefix("--").split(".")[-1] in err
    assert not (tmp_path / "out").exists()


def test_skip_counts_invalid_records_by_reason(tmp_path, caplog, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(GOOD, '{"messages": [', messages(("robot", "x")), GOOD, messages(("bot", "y"))))
    monkeypatch.chdir(ROOT)
    caplog.set_level(logging.INFO)
    cli_main(["fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'out'}",
              f"--data.cache_dir={tmp_path / 'cache'}", f"--data.train_path={data}", "--data.on_invalid=skip",
              "--trainer.max_epochs=1", "--data.val_path=null"])
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train (")][0]
    assert "5 conversations read, 3 dropped (1 not valid JSON, 2 unknown role (expected one of" in summary
    assert "2 kept" in summary


def test_console_script_reports_bad_data_without_traceback(tmp_path):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([GOOD, {"messages": [{"role": "user", "content": 5}]}]))
    result = subprocess.run(
        [sys.executable, "-m", "sft_lightning.cli", "fit", "--config", "configs/tiny.yaml",
         f"--data.train_path={data}", f"--trainer.default_root_dir={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"sft-lightning: error: {data}: record 2: message 1: content is a int, not a string"
    assert "Traceback" not in result.stderr


# The console script answers these before importing Lightning, torch or transformers (sft_lightning.preflight);
# each command is also the full path's error, so the line is the same when run through cli_main above.
PREFLIGHT = {
    "missing config file": (["fit", "--config", "nope.yaml"], "nope.yaml: no such config file"),
    "config that is not YAML": (["fit", "--config", "BAD_YAML"], "BAD_YAML: not valid YAML"),
    "missing training file": (["fit", "--config", "configs/tiny.yaml", "--data.train_path", "nope.jsonl"],
                              "nope.jsonl: no such file"),
    "missing validation file (= form)": (["validate", "--config", "configs/tiny.yaml", "--data.val_path=v.json"],
                                         "v.json: no such file"),
    "missing prediction input": (["predict", "--config", "configs/tiny.yaml", "--data.predict_path=p.json"],
                                 "p.json: no such file"),
    "missing model folder": (["fit", "--config", "configs/tiny.yaml", "--model.model_name_or_path=./nope"],
                             "./nope: no such model folder"),
    "folder that is not a model": (["test", "--config", "configs/tiny.yaml", "--model.model_name_or_path", "data"],
                                   "data: not a Hugging Face model folder (it has no config.json)"),
    "negative weight": (["fit", "--config", "configs/tiny.yaml", "--data.train_path",
                         "[{path: data/chatml_data.json, weight: -1}, {path: data/chatml_zh.json, weight: 1}]"],
                        "data.train_path: data/chatml_data.json: weight and conversations must be positive (and finite)"),
    "weight and count": (["fit", "--config", "configs/tiny.yaml", "--data.train_path",
                          "[{path: data/chatml_data.json, weight: 1, conversations: 5}, data/chatml_zh.json]"],
                         "data.train_path: data/chatml_data.json: give a weight or a number of conversations, not both"),
}


@pytest.mark.parametrize("case", list(PREFLIGHT))
def test_console_script_answers_missing_inputs_without_loading_lightning(tmp_path, case):
    argv, message = PREFLIGHT[case]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    argv = [str(bad_yaml) if arg == "BAD_YAML" else arg for arg in argv]
    message = message.replace("BAD_YAML", str(bad_yaml))
    # The console script's main, in a fresh interpreter that then reports which heavy modules it imported.
    probe = ("import sys; from sft_lightning.entry import main; sys.argv = ['sft-lightning', *sys.argv[1:]]\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             "print(code, sorted(m for m in ('lightning', 'torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == ["2", "[]"], result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(f"sft-lightning: error: {message}")


def test_preflight_leaves_what_it_cannot_read_to_the_full_parse(tmp_path):
    from sft_lightning.preflight import preflight

    # A section given as a dict or a file, a glob and a hub name: not judged here (the full parse does).
    preflight(["fit", "--config", "configs/tiny.yaml", "--data", "{train_path: nope.jsonl}"])
    preflight(["fit", "--config", "configs/tiny.yaml", "--data.train_path", "shards/*.jsonl"])
    preflight(["fit", "--config", "configs/tiny.yaml", "--model.model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct",
               "--data.train_path", "data/chatml_data.json"])
    preflight(["fit", "--print_config", "--data.train_path", "nope.jsonl"])
    preflight(["export", "nope.ckpt"])
    # The last value given wins, as in the full parse: a config's missing file replaced on the command line is fine.
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  train_path: nope.jsonl\nmodel:\n  model_name_or_path: models/tiny-qwen2\n")
    preflight(["fit", "--config", str(config), "--data.train_path=data/chatml_data.json"])
