"""LoRA through peft: only adapters train; fit -> export (merged) -> predict agrees with plain transformers."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_lightning.adapters import LoRA
from sft_lightning.cli import cli_main
from sft_lightning.module import SFTLitModule
from tests.conftest import ROOT, TINY_LLAMA, TINY_QWEN


@pytest.mark.parametrize("model_dir", [TINY_QWEN, TINY_LLAMA], ids=["qwen2", "llama"])
def test_only_adapter_parameters_are_trainable(model_dir):
    module = SFTLitModule(model_dir, lora=LoRA(r=4, target_modules="all-linear"))
    module.configure_model()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # every linear layer of every decoder layer got an adapter; embeddings, norms and the LM head did not
    adapted = {n.split(".lora_")[0] for n in trainable}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any("embed_tokens" in n for n in frozen) and any("norm" in n for n in frozen)


@pytest.mark.slow
def test_lora_fit_export_merged_predict(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    common = ["--config", "configs/tiny.yaml", f"--trainer.default_root_dir={tmp_path}", f"--data.cache_dir={tmp_path / 'cache'}",
              "--model.lora.r=8", "--model.lora.alpha=16"]
    cli_main(["fit", *common, "--trainer.max_epochs=3"])
    run = tmp_path / "lightning_logs" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    base = AutoModelForCausalLM.from_pretrained(TINY_QWEN)
    merged_dir = run / "hf_model"
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no peft
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(("proj" in n) for n in changed)  # adapters merged into the linear layers only

    out = tmp_path / "pred.jsonl"
    val = str(ROOT / "data" / "chatml_val.json")
    cli_main(["predict", *common, f"--ckpt_path={ckpt}", f"--data.predict_path={val}", f"--output_path={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cli_main(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'last_merged'}"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "last_merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "last_merged").eval()
    for row in rows[:6]:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=48, do_sample=False)[0, prompt["input_ids"].shape[1]:]
        assert tokenizer.decode(generated, skip_special_tokens=True) == row["prediction"]

    cli_main(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'adapter'}", "--adapter_only=true"])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_quantization_without_cuda_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exited:
        cli_main(["fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'out'}",
                  f"--data.cache_dir={tmp_path / 'cache'}", "--model.lora.r=8", "--model.quantization=4bit"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "sft-lightning: error: model.quantization=4bit needs a CUDA GPU (bitsandbytes); none is available here\n"
    )
    assert not (tmp_path / "out").exists()


def test_qlora_checkpoint_exports_adapters_over_a_full_precision_base(tmp_path):
    # A QLoRA checkpoint holds a 4-bit base; export rebuilds the base from its folder and merges only the adapters.
    module = SFTLitModule(TINY_QWEN, lora=LoRA(r=4))
    module.configure_model()
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)  # trained adapters (lora_B starts at zero)
    state = {name: tensor for name, tensor in module.state_dict().items()}
    state["model.base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"] = torch.zeros(1, dtype=torch.uint8)
    path = tmp_path / "qlora.ckpt"
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": state}
    module.on_save_checkpoint(checkpoint)  # as Lightning's save does: the hyper-parameters made loadable
    checkpoint["hyper_parameters"]["quantization"] = "4bit"
    torch.save(checkpoint, path)
    cli_main(["export", f"--ckpt_path={path}", f"--output_dir={tmp_path / 'hf'}"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    expected = module.model.merge_and_unload()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
