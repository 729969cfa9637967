"""Build the repo's embedded assets reproducibly: sample ChatML data and two tiny random models.

    python scripts/build_tiny_assets.py

writes ``data/chatml_{data,val}.json`` (and the Chinese ``data/chatml_zh{,_val}.json``) and, in Hugging Face format, ``models/tiny-qwen2`` (Qwen2 architecture,
ChatML template) and ``models/tiny-llama3`` (Llama architecture, Llama-3 header template). Both use a
byte-level BPE tokenizer trained here on the sample data, so any text round-trips. The models load through
``from_pretrained`` exactly like a hub model; they are small enough to train on a laptop CPU in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sft_lightning.data import COUNTRIES, WORDS, example_conversation, example_conversations

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
VOCAB_SIZE = 1024

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The Meta-Llama-3-Instruct template, verbatim in behaviour: BOS first, header tokens, trimmed content.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

def write_data(rng: random.Random) -> list[dict]:
    conversations = [example_conversation(rng) for _ in range(360)]
    (ROOT / "data").mkdir(exist_ok=True)
    for name, rows in (("chatml_data.json", conversations[:320]), ("chatml_val.json", conversations[320:])):
        (ROOT / "data" / name).write_text(json.dumps(rows, indent=1) + "\n")
    return conversations


def write_chinese_data() -> None:
    """The same kind of sample data in Chinese (``data/chatml_zh{,_val}.json``); the tiny tokenizers are byte-level,
    so they spell any character."""
    conversations = example_conversations(360, seed=SEED, language="zh")
    for name, rows in (("chatml_zh.json", conversations[:320]), ("chatml_zh_val.json", conversations[320:])):
        (ROOT / "data" / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def train_tokenizer(corpus: list[str], special_tokens: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def save_model(name, model_cls, config, tokenizer: PreTrainedTokenizerFast, stop_ids: list[int]) -> None:
    torch.manual_seed(SEED)
    model = model_cls(config)
    out = ROOT / "models" / name
    model.generation_config = GenerationConfig(
        eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, bos_token_id=config.bos_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tokenizer)})")


def main() -> None:
    rng = random.Random(SEED)
    conversations = write_data(rng)
    write_chinese_data()
    corpus = [m["content"] for c in conversations for m in c["messages"]] + ["system", "user", "assistant"]
    corpus += [" ".join(WORDS + list(COUNTRIES.values()))] * 4
    sizes = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048)

    qwen_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    qwen_tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(corpus, qwen_specials),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=qwen_specials[1:],
        chat_template=QWEN_TEMPLATE, model_max_length=2048,
    )
    qwen_cfg = Qwen2Config(vocab_size=len(qwen_tok), tie_word_embeddings=True, bos_token_id=None,
                           eos_token_id=qwen_tok.eos_token_id, pad_token_id=qwen_tok.pad_token_id, **sizes)
    save_model("tiny-qwen2", Qwen2ForCausalLM, qwen_cfg, qwen_tok, [qwen_tok.convert_tokens_to_ids("<|im_end|>")])

    llama_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    llama_tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(corpus, llama_specials),
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", additional_special_tokens=llama_specials[2:],
        chat_template=LLAMA3_TEMPLATE, model_max_length=2048,
    )
    # Like Llama 3, no pad token: the trainer must cope (it pads with eos and masks by position).
    llama_cfg = LlamaConfig(vocab_size=len(llama_tok), tie_word_embeddings=False,
                            bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id, **sizes)
    stop = [llama_tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    save_model("tiny-llama3", LlamaForCausalLM, llama_cfg, llama_tok, stop)


if __name__ == "__main__":
    main()
