"""The causal language model of a checkpoint, as Hugging Face ``from_pretrained`` builds it: a text model as it is,
and the language model alone of an image-text checkpoint (Gemma 3 and 4, Mistral 3: the hub's instruction-tuned
Gemma 3 and Qwen3.5 models are image-text checkpoints), so that what is trained and exported is a plain causal LM."""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging
from transformers.utils.import_utils import get_current_accelerator

from sft_lightning.errors import ModelLoadError, loading
from sft_lightning.linear_attention import keep_linear_attention_apart
from sft_lightning.lm_head import CHUNK_ABOVE_MB, install_chunked_head

DType = Literal["auto", "float32", "bfloat16", "float16"]

# Where an image-text checkpoint keeps its language model's weights: the hub's layout (``language_model.model.``,
# Gemma 3's release) or transformers' own since 4.52 (``model.language_model.``); renamed to a text model's names as
# they are read. The vision tower's weights are left unread.
LANGUAGE_MODEL_KEYS = {
    r"^language_model\.model\.": "model.",
    r"^model\.language_model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
}


def language_model_config(config):
    """The config to build the causal LM from: ``config`` itself for a text model, the text part of an image-text one
    (whose causal-LM class in transformers may build the vision tower too: ``Gemma3ForConditionalGeneration``)."""
    return config.get_text_config()


def causal_lm_config(path: str, trust_remote_code: bool = False):
    """The config of ``path``'s causal LM (:func:`language_model_config`), read once."""
    with loading(path, "model"):
        return language_model_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


def build_causal_lm(
    path: str,
    torch_dtype: DType = "float32",
    trust_remote_code: bool = False,
    attn_implementation: Optional[str] = None,
    pretrained: bool = True,
    quantization_config=None,
):
    """Load ``path`` through ``from_pretrained``, or with ``pretrained`` False build its architecture from the config
    alone (random weights, inside ZeRO-3's ``zero.Init``; on the meta device otherwise).

    Hub kernels stay off (``use_kernels=False``): transformers 5.25 turns them on by default wherever the ``kernels``
    package is installed (a dependency of transformers itself), and then ``model.train()`` re-kernelizes the layers,
    replacing their forwards with kernels fetched from the Hugging Face Hub at run time: the packed linear-attention
    forward installed here was silently dropped, and training numerics would depend on the network. The same model
    as ``from_config`` builds, which never kernelizes."""
    dtype = torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
    with loading(path, "model"):
        full = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        config = language_model_config(full)
        if not pretrained:
            return AutoModelForCausalLM.from_config(
                config, dtype=None if dtype == "auto" else dtype, trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
            )
        if config is full:
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                quantization_config=quantization_config, use_kernels=False,
            )
        # The vision tower's weights are left unread on purpose: transformers would list each one as unexpected.
        # What matters, a language-model weight not found, is checked here instead.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, config=config, key_mapping=LANGUAGE_MODEL_KEYS, output_loading_info=True, dtype=dtype,
                trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                quantization_config=quantization_config, use_kernels=False,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"], key=lambda name: (name.startswith("lm_head."), name))  # the body first
    if missing:
        raise ModelLoadError(
            f"{path}: an image-text checkpoint whose language model was not found under language_model.model. or "
            f"model.language_model. ({len(missing)} weights missing, e.g. {missing[0]})"
        )
    # transformers 5.24 keeps the renaming that loading applied (PreTrainedModel._weight_conversions, private) and
    # reverts it when saving: the exported text model would be written under the image-text names, which a text model
    # does not load. Without it, saving writes the text model's own names, as for a model built from its config.
    model._weight_conversions = None
    return model


def init_buffers(model) -> None:
    """Compute the buffers that no state dict holds (the rotary ``inv_freq``, Gemma's ``embed_scale``) of a model whose
    tensors were created empty (``to_empty`` after the meta device). Call it before the weights are loaded: it may
    reset the parameters of a module that owns such a buffer (Gemma's scaled embedding).

    transformers 5.24 computes these buffers in ``PreTrainedModel._init_weights`` (private), which is applied here
    only to the modules that own such a buffer, the same way ``from_pretrained`` applies it to them."""
    owners = {name.rpartition(".")[0] for name, _ in model.named_non_persistent_buffers()}
    for owner in sorted(owners):
        model._init_weights(model.get_submodule(owner))


class TrainingChanges(NamedTuple):
    added_tokens: int  # embedding rows added for the tokenizer's vocabulary
    linear_layers: int  # linear-attention layers kept apart in packed rows


def prepare_for_training(model, vocabulary: int, pretrained: bool, gradient_checkpointing: bool,
                         activation_offloading: bool, lm_head_chunk_tokens: Optional[int],
                         lm_head_chunk_above_mb: float = CHUNK_ABOVE_MB) -> TrainingChanges:
    """Make a built model ready to train here: the tokenizer's ``vocabulary`` (the ChatML fallback adds
    <|im_start|>/<|im_end|> to a template-less tokenizer; new rows start at the mean embedding, and a model without
    weights yet, on meta, gets them from its checkpoint), activation checkpointing (each checkpointed layer's input in
    pinned host memory with ``activation_offloading``), linear-attention layers that keep packed samples apart, and the
    LM head scored in chunks of ``lm_head_chunk_tokens`` positions where a micro-batch's logits would take more than
    ``lm_head_chunk_above_mb`` MiB."""
    added = max(vocabulary - model.get_input_embeddings().num_embeddings, 0)
    if added:
        model.resize_token_embeddings(vocabulary, mean_resizing=pretrained)
    if gradient_checkpointing:
        # Without an accelerator the activations are in host memory already (and transformers 5.24 would ask for
        # pinned memory, which a CPU-only torch refuses).
        offload = activation_offloading and get_current_accelerator() is not None
        if activation_offloading and not offload:
            rank_zero_info("model.activation_offloading: no accelerator here, the activations stay where they are")
        model.activation_checkpointing_enable({"use_reentrant": False}, offload=offload)
    linear_layers = keep_linear_attention_apart(model)
    if lm_head_chunk_tokens:
        why_not = install_chunked_head(model, lm_head_chunk_tokens, lm_head_chunk_above_mb * 2**20)
        if why_not and pretrained:
            rank_zero_info(f"model.lm_head_chunk_tokens: the LM head and the loss run unchunked: {why_not}")
    return TrainingChanges(added, linear_layers)
