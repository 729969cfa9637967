"""Tokenised splits: flat arrays equal to rendering one by one, a content-keyed cache, parallel workers."""

import json

import numpy as np
import pytest

from sft_lightning import tokenized
from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.render import load_tokenizer, training_samples
from sft_lightning.tokenized import RenderSettings, tokenize_split
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

    monkeypatch.setattr(tokenized, "training_samples_batch", no_rendering)
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


def test_parallel_workers_give_the_same_arrays(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenized, "CHUNK", 50)  # several chunks across the workers
    alone = tokenize_split(DATA, tokenizer, 128, "assistant", workers=0)
    parallel = tokenize_split(DATA, tokenizer, 128, "assistant", workers=2)
    for name in ("input_ids", "labels", "offsets"):
        np.testing.assert_array_equal(getattr(parallel, name), getattr(alone, name))
    assert parallel.truncated == alone.truncated
