"""MFU accounting: dense peaks by device name, parameters counted whole under sharding, the LM head by the
positions it runs on."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sft_lightning.collate import batch_counts
from sft_lightning.throughput import FlopParameters, ThroughputLogger, dense_peak_flops, matmul_parameters, training_flops
from tests.conftest import TINY_LLAMA, TINY_QWEN


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.0), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0), ("NVIDIA GB200", 2500.0), ("NVIDIA H20", 148.0),
])
def test_dense_peaks_by_device_name(name, tflops):
    assert dense_peak_flops(name) == pytest.approx(tflops * 1e12)


def test_unknown_devices_and_the_override():
    assert dense_peak_flops("Intel Xeon") is None
    logger = ThroughputLogger(peak_tflops=100.0)
    logger.setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), precision="32-true"), None, "fit")
    assert logger.available_flops == 1e14
    plain = ThroughputLogger()
    plain.setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), precision="bf16-mixed"), None, "fit")
    assert plain.available_flops is None  # a CPU: no MFU


def test_matmul_parameters_split_body_and_head_tied_and_untied():
    for path in (TINY_QWEN, TINY_LLAMA):
        model = AutoModelForCausalLM.from_pretrained(path)
        config = model.config
        embedding = config.vocab_size * config.hidden_size
        total = sum(p.numel() for p in model.parameters())
        body, head = matmul_parameters(model)
        assert head == embedding
        # tied (Qwen2 tiny): the one matrix is the head; untied (Llama tiny): the input embedding is a lookup
        assert body == total - embedding - (0 if config.tie_word_embeddings else embedding)


def test_partitioned_parameters_count_whole():
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_QWEN))
    whole = matmul_parameters(model)
    for parameter in model.parameters():  # what ZeRO-3 leaves: an empty placeholder that knows its size
        parameter.ds_numel = parameter.numel()
        parameter.data = torch.empty(0)
    assert matmul_parameters(model) == whole


def test_the_lm_head_counts_only_where_it_runs():
    config = AutoConfig.from_pretrained(TINY_QWEN)
    counts = batch_counts([10, 20], supervised=5, slots=40)
    one = training_flops(config, FlopParameters(1000, 500), counts)
    more = training_flops(config, FlopParameters(1000, 500), counts._replace(supervised=6))
    assert more - one == 6 * 500  # one more position through the head
    attention = 12 * config.num_hidden_layers * config.hidden_size * (10**2 + 20**2)
    assert one == 6 * 1000 * 30 + 6 * 500 * 5 + attention
