"""Bad input ends the command with one clear line, exit status 2, no traceback, and nothing written."""

import json
import subprocess
import sys

import pytest

from sft_lightning.cli import cli_main
from tests.conftest import ROOT

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def run_fit(tmp_path, capsys, monkeypatch, *extra):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'out'}", *extra])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("{oops", "line 1: not valid JSON"),
        (json.dumps(GOOD) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "line 2: message 1: unknown role 'robot'"),
        ("", "the file is empty"),
    ],
)
def test_bad_training_file(tmp_path, capsys, monkeypatch, content, message):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    code, err = run_fit(tmp_path, capsys, monkeypatch, f"--data.train_path={data}")
    assert code == 2
    assert err.strip().startswith(f"sft-lightning: error: {data}: {message}")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.ckpt"))


def test_missing_model_path(tmp_path, capsys, monkeypatch):
    code, err = run_fit(tmp_path, capsys, monkeypatch, f"--model.model_name_or_path={tmp_path / 'nope'}")
    assert code == 2 and "Traceback" not in err
    assert str(tmp_path / "nope") in err and len(err.strip().splitlines()) == 1


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
