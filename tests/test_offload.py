"""Activation offloading (``model.activation_offloading``, transformers' ``activation_checkpointing_enable(offload=
True)``): the same gradients, each checkpointed layer's input (and nothing else) through host memory, and the
planner's figures for it."""

import pytest
import torch
import transformers.modeling_utils as modeling_utils

import sft_lightning.language_model as language_model
from sft_lightning.cli import cli_main
from sft_lightning.collate import collate_training
from sft_lightning.errors import ConfigError
from sft_lightning.memory import SHARDINGS, model_config, plan_memory
from sft_lightning.module import SFTLitModule
from tests.conftest import ROOT, TINY_QWEN, fit_command


def gradients_and_offloaded(offloading: bool, monkeypatch):
    offloaded = []  # the shapes of the tensors copied to the host

    class Recording(torch.autograd.graph.save_on_cpu):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(pin_memory=False)  # this CPU has no pinned memory; the copies are the same
            pack = self.pack_hook

            def recorded(tensor):
                offloaded.append(tuple(tensor.shape))
                return pack(tensor)

            self.pack_hook = recorded

    monkeypatch.setattr(modeling_utils, "save_on_cpu", Recording)
    # As on a GPU machine (transformers offloads only where there is an accelerator).
    monkeypatch.setattr(language_model, "get_current_accelerator", lambda: torch.device("cpu"))
    module = SFTLitModule(TINY_QWEN, gradient_checkpointing=True, activation_offloading=offloading)
    module.configure_model()
    model = module.model.train()
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (2, 64)).tolist()
    module.score(collate_training(ids, ids, pad_token_id=0)).nll_sum.backward()
    return {name: p.grad for name, p in model.named_parameters()}, offloaded, model.config


def test_offloading_gives_the_same_gradients_with_each_layer_input_through_host_memory(monkeypatch):
    reference, none, config = gradients_and_offloaded(False, monkeypatch)
    gradients, offloaded, _ = gradients_and_offloaded(True, monkeypatch)
    assert none == [] and all(torch.equal(gradients[name], grad) for name, grad in reference.items())
    # Each decoder layer's input (and the small tensors its checkpoint keeps beside it); never a weight.
    layer_inputs = [shape for shape in offloaded if shape == (2, 64, config.hidden_size)]
    assert len(layer_inputs) == config.num_hidden_layers
    assert not [shape for shape in offloaded if shape in {tuple(p.shape) for p in gradients.values() if p.dim() == 2}]


def test_offloading_without_checkpointing_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="set model.gradient_checkpointing true"):
        SFTLitModule(TINY_QWEN, activation_offloading=True)


def test_the_planner_moves_the_layer_inputs_to_the_host():
    config = model_config("meta-llama/Meta-Llama-3-8B-Instruct")
    tokens, bytes_ = 32768, 2.0
    plain = plan_memory(config, 8, SHARDINGS["zero3"], tokens_per_gpu=tokens, checkpointing=True)
    moved = plan_memory(config, 8, SHARDINGS["zero3"], tokens_per_gpu=tokens, checkpointing=True,
                        activation_offloading=True, nodes=1)
    kv = config.num_key_value_heads * config.head_dim
    one_layer = tokens * (10 * config.hidden_size + 5 * config.intermediate_size + 4 * kv) * bytes_
    layer_inputs = tokens * config.hidden_size * config.num_hidden_layers * bytes_
    assert moved.activations == pytest.approx(one_layer)
    assert moved.activations_on_host == pytest.approx(layer_inputs)
    assert plain.total - moved.total == pytest.approx(layer_inputs * 1.1)  # and the 10% overhead on it
    assert moved.host_per_node == pytest.approx(8 * layer_inputs)


@pytest.mark.slow
def test_fit_with_offloading_runs_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli_main(fit_command("tiny.yaml", tmp_path, "--model.gradient_checkpointing=true",
                         "--model.activation_offloading=true", "--trainer.max_steps=2", "--trainer.max_epochs=-1"))
    assert (tmp_path / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors").is_file()
