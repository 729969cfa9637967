"""Two CPU processes (DDP, gloo) with batch 4 each apply the same gradients as one process with batch 8, and the
``sft-lightning`` command itself runs DDP on 2 processes to the end (export included), the two ranks preparing the
data together."""

import json

import numpy as np
import pytest

from sft_lightning.render import load_tokenizer
from sft_lightning.tokenized import TokenizedSplit, tokenize_split
from tests.conftest import ROOT, cli_fit
from tests.helpers import assert_same_gradients, train_gradients

pytestmark = pytest.mark.slow


def test_two_ranks_batch_4_equal_one_rank_batch_8(tmp_path):
    reference = train_gradients(tmp_path, batch_size=8)
    assert_same_gradients(train_gradients(tmp_path, batch_size=4, devices=2, strategy="ddp_spawn"), reference)


def test_two_ranks_share_packed_rows_with_the_same_gradients(tmp_path):
    reference = train_gradients(tmp_path, batch_size=8, packing=True)
    assert_same_gradients(train_gradients(tmp_path, batch_size=4, devices=2, strategy="ddp_spawn", packing=True), reference)


def test_ddp_through_the_command_prepares_the_data_in_shares_exits_0_and_exports(tmp_path, chatml_tokenizer):
    # A JSONL file in shards: each of the 2 ranks renders its share into the cache, the first joins them, all read it.
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in json.loads((ROOT / "data" / "chatml_data.json").read_text())))
    result = cli_fit("tiny.yaml", tmp_path, "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=1",
                     f"--data.train_path={data}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors").is_file()
    output = result.stdout + result.stderr
    assert "train prepared in" in output and "(by 2 processes, each its share)" in output, output[-3000:]
    [entry] = [meta.parent for meta in (tmp_path / "cache").glob("*/meta.json") if str(data) in meta.read_text()]
    shares = json.loads((entry / "meta.json").read_text())["shares"]
    assert set(shares) == {"0", "1"} and min(shares.values()) >= 2, shares
    assert not list((tmp_path / "cache").glob(".*"))  # parts and staging folders gone
    alone = tokenize_split(str(data), load_tokenizer(str(ROOT / "models" / "tiny-qwen2")), 256, "assistant", workers=0)
    shared = TokenizedSplit.load(entry)
    for name in ("input_ids", "labels", "offsets"):
        np.testing.assert_array_equal(getattr(shared, name), getattr(alone, name))


def test_bad_data_found_by_the_rank_that_prepares_it_stops_every_rank_and_leaves_nothing(tmp_path):
    # Line 8 is in rank 1's share: both ranks stop with its one line; no empty log folder (Lightning makes it before
    # the data module's setup, where the ranks prepare), no parts left in the cache.
    rows = json.loads((ROOT / "data" / "chatml_data.json").read_text())
    rows[7] = {"messages": [{"role": "bot", "content": "x"}]}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = cli_fit("tiny.yaml", tmp_path / "run", "--trainer.devices=2", "--trainer.strategy=ddp",
                     f"--data.train_path={data}")
    assert result.returncode == 2, result.stderr[-3000:]
    line = f"sft-lightning: error: {data}: line 8: message 1: unknown role 'bot'"
    assert result.stderr.count(line) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]  # said once
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["cache", "stderr.log"]
