"""Evaluation while training: generation on held-out prompts (GenerationEval), metrics per validation source, and
the loggers it all goes to."""

import json

import lightning as L
import pytest
import torch

import sft_lightning.preparing
from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.evaluation import answer_budget, answer_metrics, markdown_table, rank_share, spread
from sft_lightning.generation import Reply
from sft_lightning.layout import ConnectRunLayout
from sft_lightning.loaders import PromptDataset
from sft_lightning.module import SFTLitModule
from sft_lightning.render import IGNORE_INDEX, end_of_turn_token_id, load_tokenizer
from tests.conftest import ROOT, TINY_QWEN, fit_here
from tests.helpers import logged_steps

VAL = str(ROOT / "data" / "chatml_val.json")
ZH_VAL = str(ROOT / "data" / "chatml_zh_val.json")


def test_spread_takes_evenly_spaced_items_and_rank_shares_are_equal_and_cover_all():
    assert spread(4, 10) == [0, 2, 5, 7]
    assert spread(12, 10) == list(range(10))
    for count in range(1, 12):
        for processes in (1, 2, 3, 4):
            shares = [rank_share(count, processes, rank) for rank in range(processes)]
            assert len({len(share) for share in shares}) == 1  # synced generation: the same forwards everywhere
            assert set().union(*shares) == set(range(count))


def test_answer_metrics_count_exact_answers_ended_turns_and_lengths():
    replies = [Reply("The capital of France is Paris.", True, 8), Reply("Paris Paris Paris", False, 48)]
    metrics = answer_metrics(replies, ["The capital of France is Paris.", "Berlin."], "auto")
    assert metrics["eval/exact_match"] == 0.5
    assert metrics["eval/ended_with_eot"] == 0.5
    assert metrics["eval/answer_tokens"] == 28.0
    assert metrics["eval/rouge_l"] == 0.5  # the mean of 1 and 0


def test_answer_budget_is_twice_the_reference_plus_16_at_most_the_cap():
    assert answer_budget(10, 256) == 36
    assert answer_budget(200, 256) == 256


def test_samples_table_escapes_cells():
    table = markdown_table([["a|b", "line\nbreak", "ok"]])
    assert table.splitlines()[-1] == "| a\\|b | line<br>break | ok |"


def test_held_out_prompts_are_rendered_as_predict_renders_them():
    data = ChatMLDataModule(val_path=[VAL, ZH_VAL], tokenizer_path=TINY_QWEN, cache_dir=None)
    prompts = data.held_out_prompts(10)
    tokenizer = load_tokenizer(TINY_QWEN)
    both = PromptDataset(VAL, tokenizer).prompts + PromptDataset(ZH_VAL, tokenizer).prompts
    records = json.load(open(VAL)) + json.load(open(ZH_VAL))
    chosen = spread(10, 80)
    assert [p.prompt_ids for p in prompts] == [both[i] for i in chosen]
    assert [p.reference for p in prompts] == [records[i]["messages"][-1]["content"] for i in chosen]
    assert prompts[0].location.endswith("chatml_val.json: record 1") and prompts[-1].location.startswith(ZH_VAL)
    # What generation must produce to end the turn as the reference does: its text, <|im_end|> and the newline.
    assert [p.answer_tokens for p in prompts] == [
        len(tokenizer.encode(p.reference + "<|im_end|>\n", add_special_tokens=False)) for p in prompts]


def validated(val_path, packing: bool) -> dict[str, float]:
    module = SFTLitModule(TINY_QWEN)
    data = ChatMLDataModule(val_path=val_path, tokenizer_path=TINY_QWEN, cache_dir=None, batch_size=4,
                            max_length=128, packing=packing)
    module.connect_sources(data.source_names("val"), [])
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[ConnectRunLayout(module, data)],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, data, verbose=False)
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


@pytest.mark.parametrize("packing", [False, True])
def test_metrics_per_validation_source_equal_validating_each_source_alone(packing):
    torch.manual_seed(0)
    both = validated([VAL, {"path": ZH_VAL, "name": "zh"}], packing)
    english, chinese = validated(VAL, packing), validated(ZH_VAL, packing)
    for metric in ("loss", "ppl", "acc"):
        assert both[f"val_{metric}/chatml_val"] == pytest.approx(english[f"val_{metric}"], rel=1e-5)
        assert both[f"val_{metric}/zh"] == pytest.approx(chinese[f"val_{metric}"], rel=1e-5)
    # The total is the token mean over both: between the two, nearer the source with more supervised tokens.
    assert min(english["val_loss"], chinese["val_loss"]) < both["val_loss"] < max(english["val_loss"], chinese["val_loss"])


def eval_run(root, *extra: str) -> dict[str, list[tuple[int, float]]]:
    """The tiny config's fit for 8 epochs (160 steps) with evaluation every 50 steps and at the end: each eval/*
    scalar as (step, value)."""
    fit_here("tiny.yaml", root, "--eval.every_n_steps=50", "--eval.num_prompts=40", "--checkpoint.save_top_k=0",
             "--checkpoint.save_last=false", "--trainer.max_epochs=8", *extra)
    (log_dir,) = root.rglob("version_0")
    return {tag: values for tag, values in logged_steps(log_dir).items() if tag.startswith("eval/")}


def untrained_end_of_turn(monkeypatch):
    """A broken run: the end-of-turn token that closes every assistant turn is never trained."""
    render = sft_lightning.preparing.training_samples_batch

    def without_end_of_turn(conversations, tokenizer, *args, **kwargs):
        eot = end_of_turn_token_id(tokenizer)
        return [[sample.__class__(sample.input_ids, [IGNORE_INDEX if label == eot else label for label in sample.labels],
                                  sample.truncated, sample.differs) for sample in samples]
                for samples in render(conversations, tokenizer, *args, **kwargs)]

    monkeypatch.setattr(sft_lightning.preparing, "training_samples_batch", without_end_of_turn)


@pytest.mark.slow
def test_generation_shows_a_run_whose_end_of_turn_is_never_trained(tmp_path, monkeypatch):
    correct = eval_run(tmp_path / "correct")
    assert [step for step, _ in correct["eval/ended_with_eot"]] == [50, 100, 150, 160]
    assert correct["eval/ended_with_eot"][-1][1] >= 0.9
    untrained_end_of_turn(monkeypatch)
    broken = eval_run(tmp_path / "broken")
    # The loss looks fine (the answers are learnt), but the model never stops: every answer runs to its budget
    # (twice its reference plus 16 tokens), four times the correct run's answers.
    assert broken["eval/ended_with_eot"][-1][1] <= 0.1
    assert broken["eval/answer_tokens"][-1][1] > 3 * correct["eval/answer_tokens"][-1][1]
    written = sorted((tmp_path / "correct").rglob("generations/step*.jsonl"))
    assert [path.name for path in written] == ["step000050.jsonl", "step000100.jsonl", "step000150.jsonl",
                                                 "step000160.jsonl"]
    rows = [json.loads(line) for line in written[-1].read_text().splitlines()]
    assert len(rows) == 40 and {"question", "answer", "reference", "ended_with_eot", "tokens"} <= set(rows[0])


@pytest.mark.slow
def test_exact_match_rises_on_the_chinese_task(tmp_path):
    metrics = eval_run(tmp_path, "--data.train_path=data/chatml_zh.json", "--data.val_path=data/chatml_zh_val.json")
    exact = [value for _, value in metrics["eval/exact_match"]]
    assert exact[-1] > exact[0] and exact[-1] >= 0.25  # measured: 0.000, 0.025, 0.275, 0.275
    assert metrics["eval/ended_with_eot"][-1][1] >= 0.9


def logger_flags(kind: str, root) -> list[str]:
    return {
        "csv": ["--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root}"],
        "wandb": ["--trainer.logger=WandbLogger", "--trainer.logger.offline=true", f"--trainer.logger.save_dir={root}",
                  "--trainer.logger.project=sft"],
        "mlflow": ["--trainer.logger=MLFlowLogger", f"--trainer.logger.tracking_uri={MLFLOW_STORE.format(root=root)}",
                   "--trainer.logger.experiment_name=sft"],
    }[kind]


MLFLOW_STORE = "sqlite:///{root}/mlflow.db"
TAGS = {"train_loss", "val_loss", "val_ppl", "eval/exact_match", "eval/ended_with_eot", "eval/answer_tokens",
        "val_loss/chatml_val", "val_acc/chatml_zh_val", "train_tokens/chatml_data", "train_tokens/chatml_zh"}


def written(kind: str, root) -> tuple[set[str], dict]:
    """The metric names and hyperparameters a logger wrote, read back as its user would."""
    if kind == "csv":
        import csv
        import yaml

        (metrics,) = root.rglob("metrics.csv")
        names = set(next(csv.reader(metrics.open())))
        return names, yaml.safe_load((metrics.parent / "hparams.yaml").read_text())
    if kind == "wandb":
        import wandb

        wandb.finish()  # what the end of the process does (Lightning leaves the run open)
        (run,) = root.rglob("offline-run-*/run-*.wandb")
        names, config = set(), {}
        for record in wandb_records(run):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                names |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        return names, config
    import mlflow

    client = mlflow.MlflowClient(MLFLOW_STORE.format(root=root))
    (run,) = client.search_runs([client.get_experiment_by_name("sft").experiment_id])
    return set(run.data.metrics), run.data.params


def wandb_records(path):
    """The records of an offline W&B run file, as ``wandb sync`` would upload them: W&B 0.31 writes them (from its Go
    core) in LevelDB's log format (a 7-byte file header, 32 KiB blocks, each record chunk with a 7-byte header: CRC,
    length, type 1 full / 2 first / 3 middle / 4 last), each record a ``wandb_internal_pb2.Record``, and ships no
    Python reader for it any more."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["csv", "wandb", "mlflow"])
def test_each_logger_records_the_metrics_hparams_and_export_folder(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    fit_here("tiny.yaml", tmp_path, "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--eval.every_n_steps=3",
             "--eval.num_prompts=4", "--model.max_new_tokens=8", "--data.train_path=[data/chatml_data.json,data/chatml_zh.json]",
             "--data.val_path=[data/chatml_val.json,data/chatml_zh_val.json]", *logger_flags(kind, tmp_path))
    names, hparams = written(kind, tmp_path)
    assert TAGS <= names, sorted(names)
    (exported,) = tmp_path.rglob("hf_model")
    assert (exported / "config.json").is_file()
    # Every answer beside the run's checkpoints, whatever the logger's own folders (MLflow's database has none).
    written_steps = sorted(path.name for path in (exported.parent / "generations").glob("step*.jsonl"))
    assert written_steps == ["step000003.jsonl", "step000006.jsonl"]
    assert str(hparams["exported_model"]) == str(exported)
    assert str(hparams["model_name_or_path"]).endswith("models/tiny-qwen2")


def test_a_logger_whose_package_is_missing_is_one_line(monkeypatch, capsys):
    import lightning.pytorch.loggers.wandb as wandb_logger
    from lightning_utilities.core.imports import RequirementCache

    from sft_lightning.cli import cli_main

    # What Lightning sees where wandb is not installed.
    monkeypatch.setattr(wandb_logger, "_WANDB_AVAILABLE", RequirementCache("wandb-not-installed-here>=0.12.10"))
    with pytest.raises(SystemExit) as exited:
        cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.logger=WandbLogger"])
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sft-lightning: error: WandbLogger: Requirement 'wandb-not-installed-here>=0.12.10' not met")


def test_held_out_prompts_skip_what_validation_skips(tmp_path):
    from sft_lightning.errors import DataError
    from sft_lightning.evaluation import held_out_prompts
    from sft_lightning.sources import resolve_sources

    rows = [{"messages": [{"role": "user", "content": "Say <|im_end|> please."}, {"role": "assistant", "content": "No."}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(rows))
    sources, tokenizer = resolve_sources(str(path), "val_path", "auto"), load_tokenizer(TINY_QWEN)
    with pytest.raises(DataError, match="val.json: record 1: message 1 contains the text of the special token"):
        held_out_prompts(sources, tokenizer, 8, 256)
    (kept,) = held_out_prompts(sources, tokenizer, 8, 256, skip_invalid=True)
    assert kept.reference == "Hello!" and kept.location.endswith("record 2")
