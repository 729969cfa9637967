"""Several sources mixed by weight or count: exact quotas, deterministic draws, per-source cache and errors,
Parquet and ``datasets`` folders read as JSONL is, and a resume that refuses another mixture."""

import json
import re
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from sft_lightning import preparing
from sft_lightning.cli import cli_main
from sft_lightning.data import example_conversations, save_chatml_data
from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.errors import DataError
from sft_lightning.loaders import PromptDataset
from sft_lightning.mixture import draw, quotas, token_quotas
from sft_lightning.preflight import preflight
from sft_lightning.records import read_records
from sft_lightning.render import load_tokenizer
from sft_lightning.tokenized import tokenize_split
from sft_lightning.layout import RunLayout
from tests.conftest import ROOT, TINY_QWEN
from tests.helpers import SHAREGPT

SIZES = {"general": 300, "domain": 120, "identity": 40}
WEIGHTS = {"general": 0.7, "domain": 0.25, "identity": 0.05}


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    """Three JSONL sources whose conversations say which source they are in their system message."""
    paths = {}
    for seed, (name, count) in enumerate(SIZES.items()):
        rows = example_conversations(count, seed=seed)
        for row in rows:
            row["messages"] = [{"role": "system", "content": f"Source {name}."}] + [
                m for m in row["messages"] if m["role"] != "system"]
        paths[name] = str(save_chatml_data(rows, tmp_path / f"{name}.jsonl"))
    return paths


def mixed(sources, weights=WEIGHTS, **options) -> ChatMLDataModule:
    train = [{"path": sources[name], "weight": weight} for name, weight in weights.items()]
    data = ChatMLDataModule(train_path=train, tokenizer_path=TINY_QWEN, max_length=256, batch_size=8,
                            cache_dir=options.pop("cache_dir", None), **options)
    data.setup("fit")
    return data


def epoch_sources_of(data: ChatMLDataModule, batch) -> list[str]:
    """The source of every sample in a batch, read back from its text (a ghost batch's labels say it is none)."""
    if (batch.labels != -100).sum() == 0:
        return []
    return [name for row in batch.input_ids for name in re.findall(r"Source (\w+)\.", data.tokenizer.decode(row))]


def epoch_sources(data: ChatMLDataModule) -> tuple[list[str], list[np.ndarray]]:
    """The source of every sample one epoch trains on, and the batches."""
    found, batches = [], []
    for batch in data.train_dataloader():
        batches.append(batch.input_ids.numpy())
        found += epoch_sources_of(data, batch)
    return found, batches


def test_quotas_share_the_weighted_sources_size_exactly():
    assert quotas([300, 120, 40], [0.7, 0.25, 0.05], [None] * 3) == [322, 115, 23]
    assert quotas([5, 3, 2], [1, 1, 1], [None] * 3) == [4, 3, 3]  # largest remainders add up to 10
    # A count is exact; a source with neither gives every sample once; weights share only their sources' size.
    assert quotas([10, 7, 5], [2.0, None, None], [None, 3, None]) == [10, 3, 5]


def test_draw_repeats_a_small_source_subsamples_a_large_one_and_follows_the_seed():
    up = np.bincount(draw(200, 325, seed=1, source_index=1), minlength=200)
    assert up.sum() == 325 and up.min() == 1 and up.max() == 2 and (up == 2).sum() == 125
    down = draw(1000, 700, seed=1, source_index=0)
    assert len(set(down.tolist())) == 700
    assert np.array_equal(down, draw(1000, 700, seed=1, source_index=0))
    assert not np.array_equal(down, draw(1000, 700, seed=2, source_index=0))
    assert not np.array_equal(down, draw(1000, 700, seed=1, source_index=1))
    assert np.array_equal(draw(50, 50, seed=3, source_index=0), np.arange(50))  # no weight: every sample, in order
    # Whole passes first, so a sample's repeats are never neighbours (unshuffled data, data check's samples).
    assert draw(3, 7, seed=3, source_index=0)[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert len(draw(1000, 700, seed=-5, source_index=0)) == 700  # a negative data.seed draws too


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_an_epoch_draws_the_weights_and_the_seed_decides_it(sources, packing):
    data = mixed(sources, packing=packing)
    found, batches = epoch_sources(data)
    counts = {name: found.count(name) for name in SIZES}
    assert counts == {"general": 322, "domain": 115, "identity": 23}  # quotas([300, 120, 40], weights)
    for name, weight in WEIGHTS.items():
        assert abs(counts[name] / len(found) - weight) < 0.002
    again, other_seed = epoch_sources(mixed(sources, packing=packing))[1], epoch_sources(mixed(sources, packing=packing, seed=7))[1]
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    assert len(other_seed) == len(batches) and not all(np.array_equal(a, b) for a, b in zip(batches, other_seed))


def test_two_ranks_draw_the_same_mixture_and_share_it_without_overlap(sources):
    ranks = []
    for rank in (0, 1):
        data = ChatMLDataModule(train_path=[{"path": sources[n], "weight": w} for n, w in WEIGHTS.items()],
                                tokenizer_path=TINY_QWEN, max_length=256, batch_size=4, cache_dir=None)
        # The layout of rank `rank` of 2, and what the data module reads of its trainer (a stand-in here; test_resume
        # runs the real ones).
        data.trainer = SimpleNamespace(num_devices=2, training=True, strategy=SimpleNamespace(root_device=torch.device("cpu")))
        data.connect_layout(RunLayout(processes=2, rank=rank, data_parallel_size=2, data_parallel_rank=rank, accumulation=2))
        data.setup("fit")
        ranks.append((data, [(epoch_sources_of(data, batch), batch.step_supervised_tokens) for batch in data.train_dataloader()]))
    (first, batches0), (second, batches1) = ranks
    assert first.splits["train"].fingerprint() == second.splits["train"].fingerprint()
    assert first.splits["train"].fingerprint()["counts"] == [[300, 322], [120, 115], [40, 23]]
    assert [tokens for _, tokens in batches0] == [tokens for _, tokens in batches1]  # one step denominator
    together = [name for found, _ in batches0 + batches1 for name in found]
    assert {name: together.count(name) for name in SIZES} == {"general": 322, "domain": 115, "identity": 23}


def test_setup_summary_shows_each_source_planned_and_drawn(sources):
    data = mixed(sources, {"general": 0.7, "domain": 0.3})
    lines = data.splits["train"].summary("train").splitlines()
    assert lines[0].startswith(f"train source 1/2 ({sources['general']}): 300 conversations read, 0 dropped")
    assert lines[2].startswith("train mixture (drawn once from data.seed 42): 420 samples per epoch, ")
    assert re.fullmatch(rf"  1 {re.escape(sources['general'])} \(weight 0.7\): samples 70.0% planned, 294 drawn = 70.0% "
                        r"\(294 of 300 kept, none twice\); supervised tokens \d+\.\d% planned, \d+ drawn = \d+\.\d%", lines[3])
    assert re.fullmatch(rf"  2 {re.escape(sources['domain'])} \(weight 0.3\): samples 30.0% planned, 126 drawn = 30.0% "
                        r"\(from 120 kept, each 1-2 times\); .*", lines[4])
    upsampled = mixed(sources, {"general": 0.5, "identity": 0.5}).splits["train"].summary("train").splitlines()
    assert "170 drawn = 50.0% (from 40 kept, each 4-5 times)" in upsampled[-1]
    # Planned token shares follow from each source's mean supervised tokens; drawn ones from the samples drawn.
    tokens = [float(share) for share in re.findall(r"supervised tokens (\d+\.\d)% planned, \d+ drawn = (\d+\.\d)%", "\n".join(lines))[0]]
    assert abs(tokens[0] - tokens[1]) < 2


def test_changing_a_weight_tokenises_nothing(sources, tmp_path, monkeypatch):
    mixed(sources, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(preparing, "training_samples_batch", lambda *a, **k: pytest.fail("tokenised again"))
    data = ChatMLDataModule(
        train_path=[{"path": sources["general"], "weight": 1}, {"path": sources["domain"], "conversations": 500},
                    {"path": sources["identity"], "weight": 3}],
        tokenizer_path=TINY_QWEN, max_length=256, cache_dir=str(tmp_path / "cache"))
    data.setup("fit")
    summary = data.splits["train"].summary("train")
    assert summary.count(", cached): ") == 3 and len(data.splits["train"]) == 85 + 500 + 255


def test_parquet_and_a_datasets_folder_read_to_the_same_arrays_as_jsonl(tmp_path):
    chatml = json.loads((ROOT / "data" / "chatml_data.json").read_text())[:40]
    tokenizer = load_tokenizer(TINY_QWEN)
    for rows, format in ((chatml, "chatml"), (SHAREGPT, "sharegpt")):
        jsonl = tmp_path / f"{format}.jsonl"
        jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
        # Every column in every row, null where a row lacks it, as a Parquet export holds them (from_list would
        # otherwise keep only the first row's keys).
        columns = sorted({key for row in rows for key in row})
        table = datasets.Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])
        table.to_parquet(str(tmp_path / f"{format}.parquet"))
        table.save_to_disk(str(tmp_path / f"{format}_folder"))
        expected = tokenize_split(str(jsonl), tokenizer, 128, "assistant", format=format)
        for path in (tmp_path / f"{format}.parquet", tmp_path / f"{format}_folder"):
            actual = tokenize_split(str(path), tokenizer, 128, "assistant", format=format)
            for name in ("input_ids", "labels", "offsets"):
                np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), err_msg=f"{path} {name}")
    # Tools and calls of different shapes: Arrow merges them into one struct; the rows read back as written.
    tooled = [{"tools": [{"type": "function", "function": {"name": "weather", "parameters": {"city": {"type": "string"}}}}],
               "messages": [{"role": "user", "content": "Oslo?"},
                            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
                            {"role": "tool", "content": "-3 C"}, {"role": "assistant", "content": "Cold."}]},
              {"tools": [{"type": "function", "function": {"name": "add", "parameters": {"a": {"type": "integer"}}}}],
               "messages": [{"role": "user", "content": "1+2?"},
                            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]},
                            {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3."}]}]
    tools = tmp_path / "tools"  # apart from the glob below: the tiny template renders no tools
    tools.mkdir()
    (tools / "tools.jsonl").write_text("".join(json.dumps(row) + "\n" for row in tooled))
    datasets.Dataset.from_list(tooled).to_parquet(str(tools / "tools.parquet"))
    as_read = lambda path: [(r.messages, r.tools) for r in read_records(path)]  # noqa: E731
    assert as_read(tools / "tools.parquet") == as_read(tools / "tools.jsonl")
    # Predict reads them alike too.
    as_jsonl = PromptDataset(str(tmp_path / "chatml.jsonl"), tokenizer).prompts
    assert PromptDataset(str(tmp_path / "chatml.parquet"), tokenizer).prompts == as_jsonl
    assert PromptDataset(str(tmp_path / "chatml_folder"), tokenizer).prompts == as_jsonl
    # All three kinds in one mixture, ShareGPT with its own format.
    data = ChatMLDataModule(
        train_path=[str(tmp_path / "chatml.jsonl"), str(tmp_path / "chatml_folder"),
                    {"path": str(tmp_path / "*.parquet"), "format": "auto"}, {"path": str(tmp_path / "sharegpt_folder"), "format": "sharegpt"}],
        tokenizer_path=TINY_QWEN, max_length=128, cache_dir=None)
    data.setup("fit")
    assert len(data.splits["train"]) == 40 + 40 + (40 + 3) + 3
    assert f"train source 3/4 ({tmp_path / '*.parquet'}: 2 files)" in data.splits["train"].summary("train")


def test_a_path_with_glob_characters_is_read_as_named_when_it_exists(sources, tmp_path):
    literal = tmp_path / "train[v2].jsonl"
    literal.write_text(open(sources["identity"]).read())
    data = ChatMLDataModule(train_path=str(literal), tokenizer_path=TINY_QWEN, max_length=256, cache_dir=None)
    data.setup("fit")
    assert len(data.splits["train"]) == 40


def test_errors_name_the_source_and_its_row(sources, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(sources["identity"]).read().replace('"role": "user"', '"role": "bot"', 1))
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: line 1: message 2: unknown role 'bot'"):
        mixed({**sources, "identity": str(bad)})
    rows = [json.loads(line) for line in open(sources["domain"])][:3]
    rows[1]["messages"][1]["content"] = ""
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'bad.parquet'))}: row 2: message 2: user content is empty$"):
        read_records(tmp_path / "bad.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    problems = {
        str(tmp_path / "none" / "*.jsonl"): f"{tmp_path / 'none' / '*.jsonl'}: matches no file",
        str(tmp_path / "dict"): f"{tmp_path / 'dict'}: a DatasetDict folder; name one of its splits (train), e.g. {tmp_path / 'dict' / 'train'}",
        str(tmp_path): f"{tmp_path}: a folder, but not one written by datasets' save_to_disk (no state.json or dataset_info.json)",
        "[{path: x.jsonl, wieght: 1}]": "data.train_path: '[{path: x.jsonl, wieght: 1}]' is not a list of sources",
    }
    for path, message in problems.items():
        with pytest.raises(DataError, match=f"^{re.escape(message)}"):
            ChatMLDataModule(train_path=[path], tokenizer_path=TINY_QWEN).setup("fit")
    general = sources["general"]
    mistakes = {
        "give a weight or a number of conversations, not both": [{"path": general, "weight": 1, "conversations": 5}],
        "weight and conversations must be positive (and finite)": [{"path": general, "weight": float("inf")}],
        "a weight shares the epoch among the weighted sources and this is the only one": [{"path": general, "weight": 2}, general],
    }
    for message, train in mistakes.items():
        with pytest.raises(DataError, match=rf"^data.train_path: {re.escape(general)}: {re.escape(message)}"):
            ChatMLDataModule(train_path=train, tokenizer_path=TINY_QWEN).setup("fit")
    with pytest.raises(DataError, match=r"^data.train_path: \{'weight': 1\} is not a source"):
        ChatMLDataModule(train_path=[{"weight": 1}], tokenizer_path=TINY_QWEN).setup("fit")
    with pytest.raises(DataError, match=r"missing.jsonl: no such file$"):  # answered before Lightning is imported
        preflight(["fit", "--data.train_path", f"[{sources['general']}, {{path: missing.jsonl, weight: 1}}]"])
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(DataError, match=r"bad.parquet: reading Parquet files and datasets folders needs the datasets "
                                        r"package: pip install 'sft-lightning\[datasets\]'$"):
        read_records(tmp_path / "bad.parquet")


def test_resume_refuses_a_position_counted_on_another_mixture(sources):
    trained = mixed(sources)
    loader = trained.train_dataloader()
    for _ in range(3):  # three micro-batches trained
        loader.count_trained()
    position = trained.state_dict()
    assert position["micro_batches_done"] == 3 and position["mixture"]["counts"] == [[300, 322], [120, 115], [40, 23]]
    same = mixed(sources)
    same.load_state_dict(position)
    assert same.train_dataloader().trained == 3
    other = mixed(sources, {"general": 0.5, "domain": 0.5})
    other.load_state_dict(position)
    with pytest.raises(DataError, match=r"^data.train_path: the checkpoint trained on sources of 300/322, 120/115, 40/23 "
                                        r"\(kept/drawn samples\) and this run has 300/210, 120/210: resuming"):
        other.train_dataloader()
    reseeded = mixed(sources, seed=7)
    reseeded.load_state_dict(position)
    with pytest.raises(DataError, match=r"^data.train_path: the checkpoint trained on other samples in the same counts "
                                        r"\(edited data, or another data.seed\): resuming"):
        reseeded.train_dataloader()


@pytest.mark.parametrize("changed", [{"seed": 7}, {"batch_size": 4}, {"packing": True}], ids=lambda c: next(iter(c)))
def test_resume_refuses_a_position_another_plan_would_count_differently(sources, changed):
    def one_source(**options) -> ChatMLDataModule:
        data = ChatMLDataModule(train_path=sources["general"], tokenizer_path=TINY_QWEN, max_length=256,
                                cache_dir=None, **{"batch_size": 8, **options})
        data.setup("fit")
        return data

    trained = one_source()
    loader = trained.train_dataloader()
    for _ in range(3):
        loader.count_trained()
    position = trained.state_dict()
    resumed = one_source()
    resumed.load_state_dict(position)
    assert resumed.train_dataloader().trained == 3
    other = one_source(**changed)
    other.load_state_dict(position)
    with pytest.raises(DataError, match=r"^data: the checkpoint trained 3 micro-batches of epoch 0, and this run's plan "
                                        r"puts other samples in them"):
        other.train_dataloader()


def test_data_check_reports_and_checks_each_source(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich fits its tables to the terminal's width
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model:\n  model_name_or_path: {TINY_QWEN}\ndata:\n  max_length: 256\n  cache_dir: null\n  train_path:\n"
        f"    - path: {sources['general']}\n      weight: 0.8\n    - path: {sources['identity']}\n      weight: 0.2\n"
    )
    cli_main(["data", "check", "--config", str(config), "--samples", "1"])
    report = capsys.readouterr().out
    assert "train source 1/2: " in report and "train source 2/2: " in report  # a table each (rich wraps long titles)
    assert "source 2: end-of-turn trained in every sample" in report and "FAIL" not in report
    # Rendering and the model's generation_config once, five checks per source.
    assert report.count("PASS") == 2 + 2 * 5 and "train mixture (drawn once from data.seed 42" in report
    assert "source 1: generation_config" not in report


def supervised_by_source(data: ChatMLDataModule, batch) -> dict[str, int]:
    """Supervised tokens of an unpacked batch by source, read back from each row's text."""
    found = {}
    for row, labels in zip(batch.input_ids, batch.labels):
        (name,) = re.findall(r"Source (\w+)\.", data.tokenizer.decode(row))
        found[name] = found.get(name, 0) + int((labels != -100).sum())
    return found


@pytest.mark.parametrize("packing", [False, True])
def test_tokens_trained_per_source_are_what_every_rank_trained_together(sources, packing):
    """``train_tokens/<source>`` comes from the plan on each rank alone: after k micro-batches on each of 2 ranks, the
    supervised tokens both ranks' batches hold, by source; after the epoch, every drawn sample's."""
    ranks = []
    for rank in (0, 1):
        data = ChatMLDataModule(train_path=[{"path": sources[n], "weight": w} for n, w in WEIGHTS.items()],
                                tokenizer_path=TINY_QWEN, max_length=256, batch_size=4, cache_dir=None, packing=packing)
        data.trainer = SimpleNamespace(num_devices=2, training=True, strategy=SimpleNamespace(root_device=torch.device("cpu")))
        data.connect_layout(RunLayout(processes=2, rank=rank, data_parallel_size=2, data_parallel_rank=rank))
        data.setup("fit")
        loader = data.train_dataloader()
        counts, trained = [], {}
        for batch in loader:
            data.on_before_batch_transfer(batch, 0)
            if not packing and (batch.labels != -100).any():
                for name, tokens in supervised_by_source(data, batch).items():
                    trained[name] = trained.get(name, 0) + tokens
            counts.append((dict(trained), data.trained_tokens_by_source()))
        ranks.append(counts)
    mixture = data.splits["train"]
    drawn = {s.source.name: sum(s.supervised_tokens[i] for i in s.drawn) for s in mixture.sources}
    assert ranks[0][-1][1] == ranks[1][-1][1] == drawn  # the names: each file's, without its extension
    assert ranks[0][0][1] != drawn
    if not packing:
        for (mine, logged), (theirs, logged_there) in zip(*ranks):
            assert logged == logged_there == {n: mine.get(n, 0) + theirs.get(n, 0) for n in drawn}


def test_token_quotas_share_supervised_tokens():
    # Means of 10 and 40 supervised tokens a sample: equal weights give each 2,500 of the 5,000 tokens.
    assert token_quotas([100, 100], [1000, 4000], [0.5, 0.5], [None, None]) == [250, 62]
    assert token_quotas([100, 100, 7], [1000, 4000, 70], [1.0, 1.0, None], [None, None, 3]) == [250, 62, 3]


def test_weights_in_supervised_tokens_draw_that_share_of_tokens(sources):
    data = mixed(sources, {"general": 0.5, "domain": 0.5}, weight_by="tokens")
    lines = data.splits["train"].summary("train").splitlines()
    shares = re.findall(r"\(weight 0.5 of supervised tokens\): samples [\d.]+% planned, \d+ drawn = [\d.]+% .*; "
                        r"supervised tokens ([\d.]+)% planned, \d+ drawn = ([\d.]+)%", "\n".join(lines))
    assert len(shares) == 2
    for planned, drawn in shares:
        assert float(planned) == 50.0 and abs(float(drawn) - 50.0) < 1.0
    by_samples = mixed(sources, {"general": 0.5, "domain": 0.5})
    assert data.splits["train"].fingerprint() != by_samples.splits["train"].fingerprint()  # a resume tells them apart
