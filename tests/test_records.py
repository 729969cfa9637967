import json
import re

import pytest

from sft_lightning.errors import DataError
from sft_lightning.formats import to_chatml
from sft_lightning.records import read_records

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(tmp_path, text: str, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_jsonl_and_json_array(tmp_path):
    assert read_records(write(tmp_path, json.dumps(GOOD) + "\n\n" + json.dumps(GOOD)))[1].messages == GOOD["messages"]
    records = read_records(write(tmp_path, json.dumps([GOOD, GOOD]), "data.json"))
    assert [r.location.rsplit(": ", 1)[1] for r in records] == ["record 1", "record 2"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, "line 2: message 1: unknown role 'bot'"),
        ({"messages": [{"role": "user"}]}, "line 2: message 1: content is missing"),
        ({"messages": [{"role": "user", "content": 3}]}, "line 2: message 1: content is a int, not a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: no assistant turn"),
        ({"messages": []}, "line 2: 'messages' must be a non-empty list"),
        ({"text": "hi"}, "line 2: no 'messages' key (keys: text)"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "line 2: the conversation must start with a user turn"),
        ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}, "line 2: message 1: user content is empty"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "line 2: message 2: two user turns in a row"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = write(tmp_path, json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_broken_json_empty_missing_and_undecodable(tmp_path):
    with pytest.raises(DataError, match=r"data.jsonl: line 2: not valid JSON"):
        read_records(write(tmp_path, json.dumps(GOOD) + "\n{oops\n"))
    with pytest.raises(DataError, match="the file is empty"):
        read_records(write(tmp_path, "\n"))
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match="line 2: not valid UTF-8"):
        read_records(path)
    with pytest.raises(DataError, match=r"record 2: expected an object"):
        read_records(write(tmp_path, json.dumps([GOOD, 7]), "data.json"))


def test_files_saved_by_windows_editors(tmp_path):
    # UTF-8 with a byte-order mark (Notepad's "UTF-8"): read as UTF-8, JSONL and JSON arrays alike.
    chinese = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    for name, text in (("bom.jsonl", json.dumps(chinese, ensure_ascii=False) + "\n"),
                       ("bom.json", json.dumps([chinese], ensure_ascii=False))):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [record.messages for record in read_records(path)] == [chinese["messages"]]
    # GBK (Chinese Windows' ANSI): refused with the way out.
    path = tmp_path / "gbk.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n" + json.dumps(chinese, ensure_ascii=False) + "\n").encode("gbk"))
    with pytest.raises(DataError, match=r"gbk.jsonl: line 2: not valid UTF-8 \(.*\): save the file as UTF-8 \(it may be in "
                                        r"another encoding, such as GBK"):
        read_records(path)


def test_prediction_inputs_may_end_with_the_user(tmp_path):
    row = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]}
    assert len(read_records(write(tmp_path, json.dumps(row)), require_assistant=False)) == 1


def test_tool_conversations_keep_calls_results_and_schemas(tmp_path):
    row = {
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "reasoning_content": "Look it up.",
             "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "name": "weather", "content": "-3 C"},
            {"role": "assistant", "content": "It is -3 C in Oslo."},
        ],
    }
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [record] = read_records(path)
    assert record.tools == row["tools"]
    assert record.messages[1] == {"role": "assistant", "content": "", "tool_calls": row["messages"][1]["tool_calls"],
                                  "reasoning_content": "Look it up."}
    assert record.messages[2] == {"role": "tool", "content": "-3 C", "name": "weather"}


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], "message 2: a tool result must follow an assistant turn with tool_calls"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]},
      {"role": "tool", "content": "x"}, {"role": "user", "content": "and?"}], "message 4: tool results must be answered by an assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}], "message 2: tool_calls must be"),
])
def test_tool_turn_errors_name_the_message(tmp_path, messages, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 1: {error}")):
        read_records(path)


def test_sharegpt_function_call_and_observation_turns():
    row = {"conversations": [{"from": "human", "value": "Weather?"},
                             {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                             {"from": "observation", "value": "-3 C"}, {"from": "gpt", "value": "Cold."}],
           "tools": '[{"name": "weather", "parameters": {}}]'}
    chatml = to_chatml(row, "auto", "f: line 1")
    assert chatml["tools"] == [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    assert [m["role"] for m in chatml["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert chatml["messages"][1]["tool_calls"] == [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]


def test_sharegpt_tools_that_are_not_schemas_are_named(tmp_path):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "tools": '["weather"]'}
    path = write(tmp_path, json.dumps(row) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 1: 'tools' must be a list of function schemas (objects)")):
        read_records(path)
