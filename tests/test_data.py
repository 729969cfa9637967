"""Data tools: the ChatML sample API, ShareGPT/Alpaca conversion, and the pre-flight check."""

import json
import re
import shutil

import numpy as np
import pytest

from sft_lightning.cli import cli_main
from sft_lightning.data_check import foreign_text
from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.data import create_chatml_sample, save_chatml_data
from sft_lightning.errors import DataError
from sft_lightning.records import read_records
from sft_lightning.render import load_tokenizer
from sft_lightning.tokenized import tokenize_split
from tests.conftest import ROOT, TINY_QWEN
from tests.helpers import SHAREGPT

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat", "system": "You translate."},
]


def test_create_and_save_chatml_samples(tmp_path):
    sample = create_chatml_sample("Be brief.", "Hi!", "Hello!")
    assert sample == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                                   {"role": "assistant", "content": "Hello!"}]}
    assert create_chatml_sample(None, "Hi!", "Hello!")["messages"][0]["role"] == "user"
    for name in ("out.jsonl", "out.json"):
        path = save_chatml_data([sample, create_chatml_sample("", "a", "b")], tmp_path / name)
        assert [r.messages for r in read_records(path)] == [sample["messages"], create_chatml_sample("", "a", "b")["messages"]]
    with pytest.raises(DataError, match=r"^sample 2: message 1: unknown role 'bot'"):
        save_chatml_data([sample, {"messages": [{"role": "bot", "content": "x"}]}], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_sample_command_writes_valid_data(tmp_path):
    cli_main(["data", "sample", str(tmp_path / "sample.jsonl"), "--count", "12"])
    assert len(read_records(tmp_path / "sample.jsonl")) == 12


def test_convert_sharegpt_exactly(tmp_path):
    source = tmp_path / "sharegpt.json"
    source.write_text(json.dumps(SHAREGPT))
    cli_main(["data", "convert", "--from", "sharegpt", str(source), str(tmp_path / "out.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hey"},
                      {"role": "assistant", "content": "Hey there."}]},
    ]


def test_convert_alpaca_exactly(tmp_path):
    source = tmp_path / "alpaca.jsonl"
    source.write_text("\n".join(json.dumps(row) for row in ALPACA))
    cli_main(["data", "convert", "--from", "alpaca", str(source), str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == [
        {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
        {"messages": [{"role": "system", "content": "You translate."},
                      {"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"}]},
    ]


def test_bad_sharegpt_row_names_the_line(tmp_path):
    source = tmp_path / "sharegpt.jsonl"
    source.write_text(json.dumps(SHAREGPT[0]) + "\n" + json.dumps({"conversations": [{"from": "robot", "value": "x"}]}))
    with pytest.raises(DataError, match=r"sharegpt.jsonl: line 2: turn 1: unknown ShareGPT speaker 'robot'"):
        read_records(source, format="sharegpt")


def test_the_data_module_reads_other_formats_directly(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps(row) for row in SHAREGPT + ALPACA))
    converted = tmp_path / "converted.jsonl"
    cli_main(["data", "convert", str(mixed), str(converted)])  # auto: row by row
    tokenizer = load_tokenizer(TINY_QWEN)
    direct, via_file = (tokenize_split(str(p), tokenizer, 128, "assistant") for p in (mixed, converted))
    np.testing.assert_array_equal(direct.input_ids, via_file.input_ids)
    np.testing.assert_array_equal(direct.labels, via_file.labels)
    assert len(direct) == 6


def write_config(tmp_path, model_dir) -> str:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model:\n  model_name_or_path: {model_dir}\n"
        f"data:\n  train_path: {ROOT / 'data' / 'chatml_data.json'}\n  max_length: 256\n  cache_dir: {tmp_path / 'cache'}\n"
    )
    return str(config)


def test_check_passes_on_the_sample_data(tmp_path, capsys):
    cli_main(["data", "check", "--config", write_config(tmp_path, TINY_QWEN)])
    report = capsys.readouterr().out
    assert "<|im_start|>assistant\n⟦" in report and "<|im_end|>⟧" in report  # trained spans, end-of-turn included
    assert "FAIL" not in report and report.count("PASS") == 7


def test_check_of_a_gpu_config_plans_a_row_of_max_length_on_its_gpus(capsys):
    # The long-context preset with the tiny Llama 3.1 (its tokenizer is what the check renders with): the planner's
    # figure for that model on the preset's 8 GPUs, sequence parallel 4 (the 8B's own figure: test_scale.py).
    cli_main(["data", "check", "--config", str(ROOT / "configs" / "llama3.1-8b-128k.yaml"), "--samples=0",
              f"--model.model_name_or_path={ROOT / 'models' / 'tiny-llama3.1'}"])
    report = " ".join(capsys.readouterr().out.split())
    assert re.search(r"PASS │ memory per GPU at max_length │ [\d.]+ GB planned per GPU on 8 GPUs .*x sequence .*parallel 4", report)


def test_check_fails_on_a_template_that_cannot_be_masked(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(TINY_QWEN, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + ' [edited]<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(SystemExit) as exited:
        cli_main(["data", "check", "--config", write_config(tmp_path, model)])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert captured.err == ("sft-lightning: error: data check failed: "
                            f"{ROOT / 'data' / 'chatml_data.json'}: record 1: the chat template renders more than the content "
                            "between the generation prompt and the end-of-turn token of message 3: 'river backwards is revir. [edited]'\n")


def test_a_trained_span_with_another_roles_text_is_found():
    # What a misread template trains: the user's question and the tool schema inside the assistant's span.
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "How warm is it in Berlin?"}, {"role": "assistant", "content": "21 degrees."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather of a city"}}]
    assert foreign_text(messages, tools, ["21 degrees.</s>"]) is None
    assert foreign_text(messages, tools, ["How warm is it in Berlin?[/INST]21 degrees.</s>"]) == ("user", "How warm is it in Berlin?")
    assert foreign_text(messages, tools, ['"Get the weather of a city"}][/AVAILABLE_TOOLS]']) == ("tool schema", "Get the weather of a city")
    assert foreign_text(messages, tools, ["Yes: ok"]) is None  # short texts are not compared


def test_data_prepare_tokenises_into_the_cache_that_fit_then_reads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    cache = tmp_path / "cache"
    cli_main(["data", "prepare", "--config", "configs/tiny.yaml", f"--data.cache_dir={cache}"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train (data/chatml_data.json): 320 conversations read")
    assert re.fullmatch(r"train prepared in \d+\.\d s: [\d,]+ conversations/s", out[1])
    assert out[2].startswith("val (data/chatml_val.json): 40 conversations read")
    assert out[-1] == f"cache: {cache}"
    # Copied elsewhere (another machine), the cache serves the same config: nothing is tokenised again.
    moved = tmp_path / "elsewhere"
    cache.rename(moved)
    data = ChatMLDataModule(train_path="data/chatml_data.json", val_path="data/chatml_val.json", tokenizer_path=TINY_QWEN,
                            max_length=256, cache_dir=str(moved))
    data.setup("fit")
    assert all(source.from_cache for name in ("train", "val") for source in data.splits[name].sources)
    assert data.preparation("train").endswith("(read from the cache)")
