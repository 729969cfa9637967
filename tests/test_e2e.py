"""fit -> validate -> predict -> export on the tiny config, checked against plain transformers."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sft_lightning.cli import cli_main
from sft_lightning.lightning_cli import SFTLightningCLI
from tests.conftest import ROOT
from tests.helpers import chat_through_pipe, logged_scalars

pytestmark = pytest.mark.slow
VAL = str(ROOT / "data" / "chatml_val.json")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short tiny fit shared by the tests below."""
    out = tmp_path_factory.mktemp("tiny")
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"--trainer.default_root_dir={out}",
            f"--data.cache_dir={out / 'cache'}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        cli = SFTLightningCLI(args=["fit", *args, "--trainer.max_epochs=3"])
    log_dir = out / "lightning_logs" / "version_0"
    return {"args": args, "cli": cli, "log_dir": log_dir, "out": out}


def test_fit_logs_lower_loss_and_exports_hf_folder(run):
    metrics = run["cli"].trainer.callback_metrics
    assert metrics["val_loss"] < 2.0  # from ~6.5 (ln of the vocabulary) at initialisation
    assert {"train_loss", "val_ppl", "val_acc", "lr"} <= set(metrics)
    hf = run["log_dir"] / "hf_model"
    assert (hf / "model.safetensors").is_file() and not list(hf.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(hf)
    eos = GenerationConfig.from_pretrained(hf).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    last = torch.load(run["log_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["hyper_parameters"]["model_name_or_path"] == str(ROOT / "models" / "tiny-qwen2")  # usable from anywhere
    scalars = logged_scalars(run["log_dir"])
    throughput = ["tokens_per_s", "supervised_tokens_per_s", "samples_per_s", "padding_fraction"]
    assert {f"throughput/{name}" for name in throughput} | {"memory/peak_gb", "train_loss"} <= set(scalars)
    tokens, supervised = scalars["throughput/tokens_per_s"], scalars["throughput/supervised_tokens_per_s"]
    assert all(0 < s < t for s, t in zip(supervised, tokens))
    assert all(0 < p < 1 for p in scalars["throughput/padding_fraction"])


def independent_val_loss(model_dir, path) -> float:
    """Token-mean NLL of assistant content + end-of-turn, computed with plain transformers and prefix rendering."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    total, count = 0.0, 0
    for row in json.load(open(path)):
        messages = row["messages"]
        ids = tokenizer.apply_chat_template(messages)["input_ids"]
        labels = [-100] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True)["input_ids"])
                end = ids.index(eot, start)
                labels[start : end + 1] = ids[start : end + 1]
        n = sum(label != -100 for label in labels)
        with torch.no_grad():
            loss = model(torch.tensor([ids]), labels=torch.tensor([labels])).loss
        total += loss.item() * n
        count += n
    return total / count


def test_validate_matches_an_independent_computation(run, monkeypatch):
    monkeypatch.chdir(ROOT)
    hf = run["log_dir"] / "hf_model"
    cli = SFTLightningCLI(args=["validate", *run["args"], f"--model.model_name_or_path={hf}"])
    reported = cli.trainer.callback_metrics["val_loss"].item()
    expected = independent_val_loss(hf, VAL)
    assert reported == pytest.approx(expected, rel=1e-4)
    assert cli.trainer.callback_metrics["val_ppl"].item() == pytest.approx(math.exp(expected), rel=1e-4)
    packed = SFTLightningCLI(args=["validate", *run["args"], f"--model.model_name_or_path={hf}", "--data.packing=true",
                                   "--data.eval_batch_size=2"])
    assert packed.trainer.callback_metrics["val_loss"].item() == pytest.approx(reported, rel=1e-5)


def test_predict_from_checkpoint_equals_plain_transformers_on_export(run, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    ckpt = run["log_dir"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "pred.jsonl"
    cli_main(["predict", *run["args"], f"--ckpt_path={ckpt}", f"--data.predict_path={VAL}", f"--output_path={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    inputs = json.load(open(VAL))
    assert [r["messages"] for r in rows] == [i["messages"] for i in inputs]  # input order, reference kept
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    exact = sum(r["prediction"] == r["messages"][-1]["content"] for r in rows) / len(rows)
    assert metrics["count"] == len(rows) and metrics["exact_match"] == pytest.approx(exact)
    assert 0 <= metrics["bleu"] <= 1 and 0 <= metrics["rouge_l"] <= 1
    # Generation settings on the command line win over the ones saved in the checkpoint.
    short = tmp_path / "short.jsonl"
    cli_main(["predict", *run["args"], f"--ckpt_path={ckpt}", f"--data.predict_path={VAL}", f"--output_path={short}",
              "--model.max_new_tokens=1"])
    tokenizer = AutoTokenizer.from_pretrained(run["log_dir"] / "hf_model")
    cut = [json.loads(line)["prediction"] for line in short.read_text().splitlines()]
    assert all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 1 for text in cut)
    assert cut != [r["prediction"] for r in rows]
    # A checkpoint saved before `temperature 0` meant greedy holds `do_sample`: it still loads, and decodes as told.
    old = torch.load(ckpt, weights_only=True)
    old["hyper_parameters"].update(do_sample=True, temperature=1.0)
    torch.save(old, tmp_path / "old.ckpt")
    again = tmp_path / "again.json"  # the seed trainer's name: one JSON array
    cli_main(["predict", *run["args"], f"--ckpt_path={tmp_path / 'old.ckpt'}", f"--data.predict_path={VAL}",
              f"--output_path={again}", "--model.max_new_tokens=1"])
    assert [row["prediction"] for row in json.loads(again.read_text())] == cut

    export_dir = tmp_path / "hf"
    cli_main(["export", f"--ckpt_path={ckpt}", f"--output_dir={export_dir}"])
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    for row in rows[:12]:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=48, do_sample=False)
        new_tokens = generated[0, prompt["input_ids"].shape[1] :]
        assert new_tokens[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")  # it stops by itself
        assert tokenizer.decode(new_tokens, skip_special_tokens=True) == row["prediction"]


def test_chat_through_a_pipe_uses_the_history_and_stops_at_end_of_turn(run):
    first, second = "What is the capital of France?", "What is 2 plus 3?"
    replies, cut, prompts = chat_through_pipe(run["log_dir"] / "hf_model", [first, second], "--show_prompt=true")
    assert len(replies) == 2 and all(replies) and not cut  # one line each, ended by the model's <|im_end|>
    # The second turn's prompt, as rendered by the training code, carries the first exchange.
    assert (f"<|im_start|>user\n{first}<|im_end|>\n<|im_start|>assistant\n{replies[0]}<|im_end|>\n"
            f"<|im_start|>user\n{second}<|im_end|>\n<|im_start|>assistant\n") in prompts


def test_qwen3_template_fit_predict_and_export_answer_alike(tmp_path, monkeypatch):
    """Qwen3's real template rewrites history (earlier turns lose their <think> block): fit trains turn by turn,
    and predict and plain transformers on the export give the same text from the same prompt."""
    model = tmp_path / "tiny-qwen3"
    shutil.copytree(ROOT / "models" / "tiny-qwen2", model)
    (model / "chat_template.jinja").write_text((ROOT / "tests" / "templates" / "Qwen--Qwen3-1.7B.jinja").read_text())
    monkeypatch.chdir(ROOT)
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
            f"--data.cache_dir={tmp_path / 'cache'}", f"--model.model_name_or_path={model}"]
    cli_main(["fit", *args, "--trainer.max_epochs=1", "--trainer.limit_val_batches=1"])
    ckpt = next((tmp_path / "lightning_logs").rglob("last.ckpt"))
    out, inputs = tmp_path / "pred.jsonl", tmp_path / "inputs.json"
    inputs.write_text(json.dumps(json.load(open(VAL))[:6]))
    predict = [f"--ckpt_path={ckpt}", f"--data.predict_path={inputs}", f"--output_path={out}", "--model.max_new_tokens=24"]
    cli_main(["predict", *args, *predict])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    export_dir = tmp_path / "hf"
    cli_main(["export", f"--ckpt_path={ckpt}", f"--output_dir={export_dir}"])
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert "<think>" in tokenizer.chat_template
    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt")
        generated = exported.generate(**prompt, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == row["prediction"]
