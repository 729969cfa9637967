"""The architectures people fine-tune now, each on a tiny random model built by scripts/build_tiny_architectures.py
with its family's real template: Qwen3, Qwen3-MoE, Qwen3.5 (Gated DeltaNet linear attention beside full attention),
Gemma 3 (a sliding window of 32 tokens; also as the image-text checkpoint the hub ships) and Llama 3.1 (llama3 RoPE
scaling)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from sft_lightning.attention import SDPA_VARLEN, cross_sample_influence
from sft_lightning.cli import cli_main
from sft_lightning.errors import ModelLoadError, PackingError
from sft_lightning.language_model import build_causal_lm
from sft_lightning.lm_head import ChunkedLMHead
from sft_lightning.memory import count_parameters, model_config
from sft_lightning.module import SFTLitModule
from sft_lightning.render import load_tokenizer, stop_token_ids
from sft_lightning.tokenized import tokenize_split
from tests.conftest import ROOT, fit_command
from tests.helpers import packed_logit_mismatch

ARCHITECTURES = ["qwen3", "qwen3-moe", "qwen3.5", "gemma3", "llama3.1"]


def model_dir(arch: str) -> str:
    return str(ROOT / "models" / f"tiny-{arch}")


def samples(arch: str, count: int = 8):
    split = tokenize_split(str(ROOT / "data" / "chatml_data.json"), load_tokenizer(model_dir(arch)), 256, "assistant")
    return [split.sample(i) for i in range(count)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_samples_compute_what_they_compute_alone(arch):
    module = SFTLitModule(model_dir(arch))
    module.configure_model()  # the training build: chunked head, linear-attention layers kept apart
    model = module.model.eval()
    assert isinstance(model.get_output_embeddings(), ChunkedLMHead)  # every one scores in chunks
    chosen = samples(arch)
    if arch == "gemma3":  # samples longer than the sliding window, beside shorter ones
        assert max(len(ids) for ids, _ in chosen) > model.config.sliding_window > min(len(ids) for ids, _ in chosen)
    assert packed_logit_mismatch(model, chosen, SDPA_VARLEN) < 1e-5
    tokens = torch.tensor([token for ids, _ in chosen for token in ids])
    with torch.no_grad():  # the packing check, as fit runs it, over every kind of layer
        assert cross_sample_influence(model, tokens[:60], tokens[60:120], SDPA_VARLEN).item() == 0.0


def test_linear_attention_packed_without_boundaries_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    # Under sdpa a packed row reaches the Gated DeltaNet layers without sample boundaries: the state would carry
    # from one sample into the next. The packing check measures it and stops the run before a step.
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exited:
        cli_main(fit_command("tiny.yaml", tmp_path, f"--model.model_name_or_path={model_dir('qwen3.5')}",
                             "--data.packing=true", "--model.attn_implementation=sdpa"))
    assert exited.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(error) == 1 and "packed samples attend to each other with attn_implementation=sdpa" in error[0]
    assert "use sdpa_varlen or flash_attention_2, or set data.packing false" in error[0]  # not sdpa: it cannot
    assert PackingError.__name__ not in error[0] and not list(tmp_path.rglob("*.ckpt"))


# The hub's Gemma 3 4B-27B and Qwen3.5 models are image-text checkpoints (a vision tower beside the language model).
IMAGE_TEXT = {"gemma3-vision": ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM", "gemma3"),
              "qwen3.5-vision": ("Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM", "qwen3.5")}


@pytest.mark.parametrize("arch", sorted(IMAGE_TEXT))
def test_an_image_text_checkpoint_is_trained_as_its_language_model_alone(arch, tmp_path):
    # transformers' causal-LM class for Gemma 3's is Gemma3ForConditionalGeneration, vision tower included, whose config
    # has no num_attention_heads of its own (fit failed in its first step).
    whole_class, text_class, text_arch = IMAGE_TEXT[arch]
    path = model_dir(arch)
    whole = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(whole).__name__ == whole_class
    text = build_causal_lm(path).eval()
    assert type(text).__name__ == text_class and not any("vis" in name for name, _ in text.named_parameters())
    ids = torch.tensor([list(samples(text_arch, 1)[0][0])])
    with torch.no_grad():
        assert torch.equal(text(input_ids=ids).logits, whole(input_ids=ids).logits)
        assert type(build_causal_lm(path, pretrained=False)).__name__ == text_class  # a checkpoint's build
        # The planner counts the language model: the parameters of the text-only tiny model.
        assert count_parameters(model_config(path)) == count_parameters(model_config(model_dir(text_arch)))
        text.save_pretrained(tmp_path / "saved")  # under the text model's own names
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(input_ids=ids).logits,
                           whole(input_ids=ids).logits)


def test_an_image_text_checkpoint_without_its_language_model_is_refused_in_one_line(tmp_path):
    moved = tmp_path / "renamed"
    shutil.copytree(model_dir("gemma3-vision"), moved)
    weights = load_file(moved / "model.safetensors")
    save_file({name.replace("language_model.model.", "text.model."): tensor for name, tensor in weights.items()},
              moved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"renamed: an image-text checkpoint whose language model was not found "
                                             r"under language_model.model. or model.language_model. \(\d+ weights missing"):
        build_causal_lm(str(moved))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [*ARCHITECTURES, "gemma3-vision"])
def test_packed_fit_exports_a_folder_that_generates_what_predict_does(arch, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    model = [f"--model.model_name_or_path={model_dir(arch)}", "--model.max_new_tokens=12"]
    cli_main(fit_command("tiny.yaml", tmp_path, *model, "--data.packing=true", "--data.batch_size=4",
                         "--trainer.max_steps=6", "--trainer.max_epochs=-1", "--model.learning_rate=0.01"))
    run = tmp_path / "lightning_logs" / "version_0"
    out = tmp_path / "predictions.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    records = json.loads((ROOT / "data" / "chatml_val.json").read_text())[:4]
    prompts.write_text("".join(json.dumps(record) + "\n" for record in records))
    cli_main(["predict", "--config", "configs/tiny.yaml", *model, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
              f"--data.predict_path={prompts}", f"--output_path={out}", f"--data.cache_dir={tmp_path / 'cache'}"])
    predictions = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    exported = AutoModelForCausalLM.from_pretrained(run / "hf_model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "hf_model")
    stops = stop_token_ids(tokenizer)
    for record, prediction in zip(records, predictions):
        prompt = tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        generated = exported.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
        cut = next((i for i, token in enumerate(generated.tolist()) if token in stops), len(generated))
        assert tokenizer.decode(generated[:cut], skip_special_tokens=True) == prediction
