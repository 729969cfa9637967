"""Tokenised splits: flat arrays equal to rendering one by one, a content-keyed cache, parallel workers."""

import json
import threading

import numpy as np
import pytest

from sft_lightning import preparing, records, tokenized
from sft_lightning.errors import DataError
from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.render import load_tokenizer, training_samples
from sft_lightning.preparing import RenderSettings, Share
from sft_lightning.tokenized import tokenize_split
from tests.conftest import ROOT, TINY_QWEN

DATA = str(ROOT / "data" / "chatml_data.json")


@pytest.fixture
def tokenizer():
    return load_tokenizer(TINY_QWEN)


def test_split_arrays_equal_rendering_each_conversation(tokenizer):
    split = tokenize_split(DATA, tokenizer, 64, "assistant")
    conversations = json.load(open(DATA))
    assert len(split) == split.read == len(conversations)
    for index in (0, 7, len(split) - 1):
        [expected] = training_samples(conversations[index]["messages"], tokenizer, "assistant", 64)
        ids, labels = split.sample(index)
        assert ids.tolist() == expected.input_ids and labels.tolist() == expected.labels
        assert split.supervised_tokens[index] == expected.supervised_tokens
    assert split.truncated == sum(len(training_samples(c["messages"], tokenizer)[0].input_ids) > 64 for c in conversations)


def test_second_run_reads_the_cache_without_tokenising(tokenizer, tmp_path, monkeypatch):
    first = tokenize_split(DATA, tokenizer, 256, "assistant", cache_dir=str(tmp_path))
    assert not first.from_cache

    def no_rendering(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(preparing, "training_samples_batch", no_rendering)
    second = ChatMLDataModule(train_path=DATA, tokenizer_path=TINY_QWEN, max_length=256, cache_dir=str(tmp_path))
    second.setup("fit")
    cached = second.splits["train"].sources[0].parts[0]  # the one file of the one source
    assert cached.from_cache and "cached" in second.splits["train"].summary("train")
    for name in ("input_ids", "labels", "offsets"):
        np.testing.assert_array_equal(getattr(cached, name), getattr(first, name))
    assert (cached.read, cached.truncated, cached.dropped) == (first.read, first.truncated, first.dropped)
    # Anything the arrays depend on makes a new key: here max_length, so this one must tokenise (and fails to).
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_split(DATA, tokenizer, 128, "assistant", cache_dir=str(tmp_path))


def test_cache_key_follows_content_and_settings(tokenizer, tmp_path):
    copy = tmp_path / "data.json"
    copy.write_text(open(DATA).read())
    key = tokenized.cache_key(str(copy), tokenizer, RenderSettings(256, "assistant"))
    assert key == tokenized.cache_key(str(copy), tokenizer, RenderSettings(256, "assistant"))
    assert key != tokenized.cache_key(str(copy), tokenizer, RenderSettings(256, "last"))
    assert key != tokenized.cache_key(str(copy), tokenizer, RenderSettings(256, "assistant", on_invalid="skip"))
    copy.write_text(open(DATA).read().replace("Paris", "Lyon"))
    assert key != tokenized.cache_key(str(copy), tokenizer, RenderSettings(256, "assistant"))


def test_parallel_workers_give_the_same_arrays(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setattr(preparing, "CHUNK", 50)  # several chunks across the workers
    alone = tokenize_split(DATA, tokenizer, 128, "assistant", workers=0)
    parallel = tokenize_split(DATA, tokenizer, 128, "assistant", workers=2)
    for name in ("input_ids", "labels", "offsets"):
        np.testing.assert_array_equal(getattr(parallel, name), getattr(alone, name))
    assert parallel.truncated == alone.truncated
    # JSONL: the workers read shards of the file themselves, invalid lines among them counted where they are.
    monkeypatch.setattr(records, "SHARD_BYTES", 4096)
    lines = [json.dumps(row) for row in json.load(open(DATA))]
    lines[5], lines[-3] = "{oops", json.dumps({"messages": [{"role": "bot", "content": "x"}]})
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    assert len(records.jsonl_shards(jsonl)) >= 4
    read = [tokenize_split(str(jsonl), tokenizer, 128, "assistant", workers=w, on_invalid="skip") for w in (0, 2)]
    for name in ("input_ids", "labels", "offsets"):
        np.testing.assert_array_equal(getattr(read[1], name), getattr(read[0], name))
    assert read[0].read == read[1].read == len(lines) and len(read[1]) == len(alone) - 2
    assert read[1].dropped == {"not valid JSON": 1, "unknown role (expected one of system, user, assistant, tool)": 1}
    lines[5], lines[-3] = lines[4], json.dumps({"messages": []})  # found by the worker of a later shard
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"data.jsonl: line {len(lines) - 2}: 'messages' must be a non-empty list"):
        tokenize_split(str(jsonl), tokenizer, 128, "assistant", workers=2, on_invalid="error")

def shared_runs(cache_dirs, path, tokenizer, **kwargs) -> list:
    """tokenize_split by two "ranks" (threads) that prepare together: the results, or the errors raised."""
    barrier, given = threading.Barrier(2, timeout=60), [None, None]
    results = [None, None]

    def gather(index: int, value):
        given[index] = value
        barrier.wait()
        values = list(given)
        barrier.wait()  # before either gives its next value
        return values

    def rank(index):
        share = Share(index, 2, first_on_node=index == 0 or cache_dirs[0] != cache_dirs[1],
                      gather=lambda value: gather(index, value))
        try:
            results[index] = tokenize_split(path, tokenizer, 128, "assistant", str(cache_dirs[index]), 0, share=share, **kwargs)
        except DataError as err:
            results[index] = err

    threads = [threading.Thread(target=rank, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_ranks_prepare_their_shares_into_one_cache_and_fail_together(tokenizer, tmp_path):
    lines = [json.dumps(row) for row in json.load(open(DATA))]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    alone = tokenize_split(str(jsonl), tokenizer, 128, "assistant", workers=0)
    for cache_dirs in ([tmp_path / "shared"] * 2, [tmp_path / "node0", tmp_path / "node1"]):  # shared, or one per node
        results = shared_runs(cache_dirs, str(jsonl), tokenizer)
        for split in results:
            for name in ("input_ids", "labels", "offsets"):
                np.testing.assert_array_equal(getattr(split, name), getattr(alone, name))
        written = sorted((json.loads(meta.read_text())["shares"] for folder in set(cache_dirs)
                          for meta in folder.glob("*/meta.json")), key=str)
        tasks = sum(written[0].values())
        if len(set(cache_dirs)) == 1:  # shared: every rank renders every other task
            assert written == [{"0": (tasks + 1) // 2, "1": tasks // 2}] and tasks >= 4
        else:  # one cache per node: each node's first rank renders the tasks it cannot see as well
            assert written == [{"0": tasks}, {"1": tasks}]
        assert not [p for folder in set(cache_dirs) for p in folder.glob(".*")]  # no parts or staging left
    lines[-2] = json.dumps({"messages": [{"role": "bot", "content": "x"}]})  # in rank 1's last shard
    jsonl.write_text("\n".join(lines) + "\n")
    # Raised on both, whether or not the ranks share the folder the error happened beside.
    for cache_dirs in ([tmp_path / "failing"] * 2, [tmp_path / "failing0", tmp_path / "failing1"]):
        errors = shared_runs(cache_dirs, str(jsonl), tokenizer)
        assert all(isinstance(err, DataError) for err in errors) and str(errors[0]) == str(errors[1])
        assert f"data.jsonl: line {len(lines) - 1}: message 1: unknown role 'bot'" in str(errors[0])
        assert not [meta for folder in cache_dirs for meta in folder.glob("*/meta.json")]  # nothing half-written
