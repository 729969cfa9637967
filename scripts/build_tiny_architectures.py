"""Tiny random models of the architectures people fine-tune now, each with its family's real chat template.

    python scripts/build_tiny_architectures.py

writes, in Hugging Face format, ``models/tiny-qwen3`` (Qwen3 dense: QK-norm, explicit head_dim), ``models/tiny-qwen3-moe``
(Qwen3-MoE: 4 experts, 2 per token, router aux loss), ``models/tiny-qwen3.5`` (Qwen3.5: Gated DeltaNet linear attention
with a short causal convolution, interleaved with full attention), ``models/tiny-gemma3`` (Gemma 3: a sliding-window
layer of 32 tokens and a global one, scaled embeddings, ``<start_of_turn>`` template), ``models/tiny-qwen3.5-vision``
and ``models/tiny-gemma3-vision`` (the same language models in image-text checkpoints beside a tiny vision tower, as the
hub's Qwen3.5 and Gemma 3 4B-27B models are) and ``models/tiny-llama3.1``
(Llama 3.1: llama3 RoPE scaling, the 3.1 template with its date preamble and tools). Each tokenizer is a byte-level
BPE trained here on the sample data with its family's special tokens; each template is the published one
(``tests/templates``, sources in ``tests/templates/SOURCES.tsv``). Two layers each, seeded: rebuilding writes the same
files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Gemma3Config,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen3_5Config,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "tests" / "templates"
SEED = 1234
VOCAB_SIZE = 1024
# Small, but every dimension a kernel or a check could trip on is distinct: 4 query heads over 2 key/value heads.
SIZES = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=24, max_position_embeddings=4096)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added tokens that are not special in Qwen3's tokenizer (reasoning and tool-call markers).
QWEN_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


def corpus() -> list[str]:
    data = json.loads((ROOT / "data" / "chatml_data.json").read_text())
    texts = [message["content"] for row in data for message in row["messages"]]
    return texts + ["system user assistant model tool ipython function name arguments parameters description",
                    "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024", "get_weather city Paris {}"]


def tokenizer(special: list[str], template: str, added: tuple[str, ...] = (), **tokens: str) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer)
    result = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, model_max_length=4096,
                                     additional_special_tokens=[t for t in special if t not in tokens.values()], **tokens)
    result.add_tokens(list(added))
    return result


def save(name: str, config, tok: PreTrainedTokenizerFast, stops: list[str]) -> None:
    torch.manual_seed(SEED)
    # An image-text config builds its whole model, vision tower included, as the hub's checkpoints hold it.
    builder = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = builder.from_config(config)
    out = ROOT / "models" / name
    stop_ids = [tok.convert_tokens_to_ids(t) for t in stops]
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")


def qwen_tokenizer(template: str) -> PreTrainedTokenizerFast:
    return tokenizer(QWEN_SPECIALS, template, QWEN_ADDED, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def main() -> None:
    qwen3_template = (TEMPLATES / "Qwen--Qwen3-1.7B.jinja").read_text()
    tok = qwen_tokenizer(qwen3_template)
    ids = dict(vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save("tiny-qwen3", Qwen3Config(tie_word_embeddings=True, **ids, **SIZES), tok, ["<|im_end|>"])
    moe = Qwen3MoeConfig(tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                         router_aux_loss_coef=0.001, **ids, **SIZES)
    save("tiny-qwen3-moe", moe, tok, ["<|im_end|>"])

    tok = qwen_tokenizer((TEMPLATES / "Qwen--Qwen3.5-4B.jinja").read_text())
    ids = dict(vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hybrid = Qwen3_5TextConfig(
        tie_word_embeddings=True, layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        **ids, **SIZES,
    )
    save("tiny-qwen3.5", hybrid, tok, ["<|im_end|>"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=SIZES["hidden_size"])
    save("tiny-qwen3.5-vision", Qwen3_5Config(text_config=hybrid.to_dict(), vision_config=vision, tie_word_embeddings=True),
         tok, ["<|im_end|>"])

    gemma_specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    tok = tokenizer(gemma_specials, (TEMPLATES / "google--gemma-3-1b-it.jinja").read_text(),
                    pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    gemma = Gemma3TextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id,
        tok.convert_tokens_to_ids("<end_of_turn>")], pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        sliding_window=32, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24, **SIZES,
    )
    save("tiny-gemma3", gemma, tok, ["<end_of_turn>", "<eos>"])
    # The hub's instruction-tuned Gemma 3 (4B-27B) is an image-text checkpoint: the same language model beside a
    # SigLIP vision tower, saved under the hub's names (language_model.model.*).
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    save("tiny-gemma3-vision", Gemma3Config(text_config=gemma.to_dict(), vision_config=vision.to_dict(),
                                        mm_tokens_per_image=4), tok, ["<end_of_turn>", "<eos>"])

    llama_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                      "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
    tok = tokenizer(llama_specials, (TEMPLATES / "meta-llama--Llama-3.1-8B-Instruct.jinja").read_text(),
                    bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 512}
    llama = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, rope_parameters=rope, **SIZES)
    save("tiny-llama3.1", llama, tok, ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])


if __name__ == "__main__":
    main()
