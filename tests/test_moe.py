"""Mixture of experts (the tiny Qwen3-MoE of scripts/build_tiny_architectures.py): the router's balancing loss is the
model's own, it reaches the gradient with the model's coefficient, and it is logged with the experts' load."""

import pytest
import torch
from transformers import AutoConfig

from sft_lightning.collate import collate_training
from sft_lightning.memory import SHARDINGS, plan_memory
from sft_lightning.module import SFTLitModule
from sft_lightning.render import load_tokenizer
from sft_lightning.tokenized import tokenize_split
from sft_lightning.throughput import matmul_parameters
from tests.conftest import ROOT, fit_here
from tests.helpers import logged_scalars

MOE = str(ROOT / "models" / "tiny-qwen3-moe")


def padded_batch(count: int = 6):
    split = tokenize_split(str(ROOT / "data" / "chatml_data.json"), load_tokenizer(MOE), 256, "assistant")
    chosen = [split.sample(i) for i in range(count)]
    return collate_training([ids for ids, _ in chosen], [labels for _, labels in chosen], pad_token_id=0)


@pytest.mark.parametrize("lm_head_chunk_tokens", [16, None], ids=["chunked", "whole"])
def test_the_balancing_loss_and_its_gradient_are_the_models_own(lm_head_chunk_tokens):
    module = SFTLitModule(MOE, lm_head_chunk_tokens=lm_head_chunk_tokens, lm_head_chunk_above_mb=0)
    module.configure_model()
    module.train()
    batch = padded_batch()
    stats = module.score(batch)
    ours = stats.nll_sum / stats.supervised_tokens + module.model.config.router_aux_loss_coef * stats.router.local_loss
    ours.backward()
    ours_grads = {name: p.grad.clone() for name, p in module.model.named_parameters()}
    module.model.zero_grad()
    # transformers' own: with labels and router logits it adds router_aux_loss_coef * load_balancing_loss
    theirs = module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                          output_router_logits=True, use_cache=False)
    torch.testing.assert_close(stats.router.loss, theirs.aux_loss.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, theirs.loss, rtol=1e-5, atol=0)
    theirs.loss.backward()
    for name, parameter in module.model.named_parameters():
        torch.testing.assert_close(ours_grads[name], parameter.grad, rtol=1e-4, atol=1e-7, msg=name)
    router = [name for name in ours_grads if name.endswith("gate.weight")]
    assert router and all(ours_grads[name].abs().max() > 0 for name in router)  # the routers learn from it


def test_mfu_and_the_planner_count_the_experts_a_token_uses():
    module = SFTLitModule(MOE)
    module.configure_model()
    config = module.model.config
    experts = sum(p.numel() for name, p in module.model.named_parameters() if ".experts." in name)
    total = sum(p.numel() for p in module.model.parameters())
    body, head = matmul_parameters(module.model)
    unused = experts * (1 - config.num_experts_per_tok / config.num_experts)  # 2 of 4 experts per token
    assert body == round(total - unused - head - config.vocab_size * config.hidden_size)  # untied embedding: a lookup
    plan = plan_memory(AutoConfig.from_pretrained(MOE), 1, SHARDINGS["ddp"])
    assert plan.parameters == total and plan.active == round(total - unused)  # memory holds them all


@pytest.mark.slow
def test_a_fit_logs_the_balancing_loss_and_each_layers_expert_load(tmp_path):
    fit_here("tiny.yaml", tmp_path, f"--model.model_name_or_path={MOE}", "--data.packing=true", "--data.batch_size=4",
             "--trainer.max_steps=4", "--trainer.max_epochs=-1", "--trainer.log_every_n_steps=2", "--data.val_path=null")
    scalars = logged_scalars(tmp_path / "lightning_logs" / "version_0")
    layers = AutoConfig.from_pretrained(MOE).num_hidden_layers
    expected = {"train_aux_loss", "moe/load_imbalance_mean", "moe/load_imbalance_max"}
    assert expected | {f"moe/load_imbalance/layer_{layer}" for layer in range(layers)} <= set(scalars)
    # 2 of 4 experts per token: the loss is 2 when perfectly balanced (num_experts * sum f_i P_i, f summing to top_k)
    assert all(1.5 < value < 4 for value in scalars["train_aux_loss"])
    assert all(1 <= value <= 4 for value in scalars["moe/load_imbalance_max"])  # 1 even, 4 one expert takes all
