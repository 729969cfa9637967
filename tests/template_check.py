"""Check :func:`training_samples` against a real chat template, independently of how it finds the turns.

A real template is run with a small byte-level BPE tokenizer that carries the family's special tokens (found in
the template text, plus its BOS/EOS) and a real tokenizer's pre-tokenisation (Qwen2's pattern: runs of newlines
are single tokens, so a newline that starts an answer merges with the header's newline when the whole
conversation is tokenised at once). For every assistant turn of every conversation it asserts what a user must
be able to rely on, from the template's own renders alone:

- the turn's inference prompt (``apply_chat_template(messages[:k], add_generation_prompt=True)``, tokenised on
  its own as ``generate`` gets it) is the start of the sample that trains the turn;
- the trained span right after it is the rest of the template's rendering of the turn (or, where the prompt opens
  a ``<think>`` block the rendering drops, the turn's reasoning and answer), up to and including one special
  end-of-turn token, containing the content; nothing else of the conversation is trained;
- a conversation given as one sample equals ``apply_chat_template(messages)`` token for token.
"""

from __future__ import annotations

import csv
import json
import re
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sft_lightning.errors import TemplateError
from sft_lightning.render import IGNORE_INDEX, render_text, training_samples

TEMPLATES = Path(__file__).parent / "templates"
# Qwen2's pre-tokeniser pattern (also Llama 3's, but for digit runs): words, single digits, punctuation runs,
# newline runs, other whitespace.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Special tokens as families write them: <|im_start|>, <｜Assistant｜>, <start_of_turn>, [INST], <s>, <bos>, ...
SPECIAL = re.compile(r"<\|[^|<>\s'\"]{1,40}\|>|<｜[^｜]{1,40}｜>|<\|[a-z_]{1,20}>|<[a-z_]{1,20}\|>|<(?:start|end)_of_turn>|"
                     r"<(?:bos|eos|pad)>|</?s>|\[/?[A-Z_]{3,30}\]|<(?:end_of_utterance|end_of_text|start_of_role|end_of_role)>")
# Added but not special in the real tokenizers (Qwen3, DeepSeek-R1): ordinary text to the special-token logic.
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CORPUS = [
    "Hello! How are you today? I am fine, thanks for asking.", "What is the capital of France? Paris.",
    "Be brief. You are a helpful assistant.", "The weather in Paris is sunny, 21 degrees.",
    "你好！今天天气怎么样？北京今天晴，气温二十一度。", "请用一句话回答。你是一个乐于助人的助手。",
    "system user assistant model tool function name arguments parameters description",
    "get_weather city Paris Berlin {\"type\": \"object\", \"properties\": {}}",
    "Let me think step by step. First, 2 plus 2 is 4.", "\n\n", "\n", "  indented\n\n\nthree",
]


# Edge conversations: English and Chinese, with and without a system message, 1-3 turns, answers that start with a
# newline or spaces, multi-line answers, reasoning as a field and inline, and a tool call.
def _user(content): return {"role": "user", "content": content}  # noqa: E704
def _assistant(content, **fields): return {"role": "assistant", "content": content, **fields}  # noqa: E704
def _system(content): return {"role": "system", "content": content}  # noqa: E704


CONVERSATIONS = {
    "single": [_user("Hello!"), _assistant("Hello! How are you today?")],
    "system_two_turns": [_system("Be brief."), _user("What is the capital of France?"), _assistant("Paris."),
                         _user("And of Germany?"), _assistant("Berlin.")],
    "chinese_three_turns": [_system("你是一个乐于助人的助手。"), _user("你好！"), _assistant("你好！今天天气怎么样？"),
                            _user("北京今天晴。"), _assistant("太好了。"), _user("请用一句话回答。"), _assistant("北京今天晴，气温二十一度。")],
    "leading_newline": [_user("Hello!"), _assistant("\nHello! How are you today?"), _user("fine"), _assistant("\n\nthanks")],
    "leading_space_trailing_whitespace": [_user("  Hello!  "), _assistant(" Hello! How are you today?  \n"),
                                          _user("fine\n"), _assistant("thanks\n\n")],
    "multiline": [_user("Let me think\n\nstep by step."), _assistant("First, 2 plus 2 is 4.\n\nThen 4.\n- a\n- b")],
    "reasoning_field": [_user("What is 2 plus 2?"), _assistant("4.", reasoning_content="Let me think step by step. 2 plus 2 is 4."),
                        _user("And 3 plus 3?"), _assistant("6.", reasoning_content="3 plus 3 is 6.")],
    "inline_reasoning": [_user("What is 2 plus 2?"), _assistant("<think>\nLet me think step by step.\n</think>\n\n4.")],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}}, "required": ["city"]},
}}]
# Arguments as a JSON string (OpenAI's wire format; DeepSeek's templates need it) and as an object (transformers'
# documented form; Gemma 4's templates need it): a template takes one of them.
TOOL_CONVERSATIONS = [
    [_user("The weather in Paris?"),
     _assistant("", tool_calls=[{"type": "function", "id": "call12345", "function": {"name": "get_weather", "arguments": arguments}}]),
     {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "sunny, 21 degrees"},
     _assistant("It is sunny, 21 degrees.")]
    for arguments in ('{"city": "Paris"}', {"city": "Paris"})
]
BOS = ["<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<bos>", "<s>", "<|startoftext|>"]
EOS = ["<|im_end|>", "<|eot_id|>", "<｜end▁of▁sentence｜>", "<eos>", "</s>", "<|end|>", "<|endoftext|>"]


def real_templates() -> dict[str, tuple[str | None, str | None]]:
    """The committed real templates with their BOS and EOS tokens (from the source, else the family's usual ones
    found in the template text)."""
    lines = [line for line in (TEMPLATES / "SOURCES.tsv").read_text().splitlines() if not line.startswith("#")]
    rows = list(csv.DictReader(lines, delimiter="\t"))
    return {row["file"]: (row["bos"] or None, row["eos"] or None) for row in rows}


def real_template_tokenizer(name: str, bos: str | None, eos: str | None, sentencepiece: bool = False) -> PreTrainedTokenizerFast:
    """``sentencepiece``: a SentencePiece-style tokenizer (Metaspace, ``prepend_scheme="first"``, byte fallback),
    as Mistral's, Phi-3's and Llama 2's are, instead of a byte-level one."""
    template = (TEMPLATES / name).read_text()
    found = SPECIAL.findall(template)
    bos = bos or next((t for t in BOS if t in found), "<s>" if "bos_token" in template else None)
    # Every real tokenizer has an EOS token; "<|endoftext|>" where the template does not name one.
    eos = eos or next((t for t in EOS if t in found), "</s>" if "eos_token" in template else "<|endoftext|>")
    return family_tokenizer(template, bos, eos, sentencepiece)


@lru_cache(maxsize=1)
def _base() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PATTERN), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return tokenizer.to_str()


@lru_cache(maxsize=1)
def _sentencepiece_base() -> str:
    """Metaspace pre-tokenisation with ``prepend_scheme="first"`` (a "▁" before the first word of a text, and
    every space a "▁"), and byte fallback for characters outside the vocabulary: how SentencePiece models convert."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                           decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=bytes_, initial_alphabet=["▁"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = []  # the byte tokens stay in the vocabulary as ordinary tokens, as in SentencePiece
    return json.dumps(data)


def family_tokenizer(template: str, bos: str | None = None, eos: str | None = None,
                     sentencepiece: bool = False) -> PreTrainedTokenizerFast:
    """A small tokenizer for ``template``: the family's special tokens, BOS/EOS, and the ``<think>``-style added tokens."""
    specials = sorted({*SPECIAL.findall(template), *(t for t in (bos, eos) if t)} - set(ADDED))
    base = _sentencepiece_base() if sentencepiece else _base()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(base), chat_template=template,
                                        bos_token=bos, eos_token=eos)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens([token for token in ADDED if token in template])
    return tokenizer


def check_conversation(tokenizer, messages: list[dict], tools: list[dict] | None = None, **kwargs) -> int:
    """Assert the properties above for one conversation; returns how many samples it gave."""
    samples = training_samples(messages, tokenizer, tools=tools, **kwargs)
    tokens = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    specials = set(tokenizer.all_special_ids)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    claimed = {i: set() for i in range(len(samples))}  # trained positions explained by a turn
    differs = False  # a turn's answer is not the template's own text after its prompt (or adds EOS to it)
    for k in turns:
        prompt_text = render_text(tokenizer, messages[:k], True, tools)
        prompt = tokens(prompt_text)
        owners = [i for i, s in enumerate(samples) if s.input_ids[: len(prompt)] == prompt
                  and len(s.labels) > len(prompt) and s.labels[len(prompt)] != IGNORE_INDEX]
        assert owners, f"turn {k + 1}: no sample starts with the inference prompt and trains what follows it"
        sample = samples[owners[-1]]
        end = len(prompt)  # the trained run after the prompt: the turn's answer
        while end + 1 < len(sample.labels) and sample.labels[end + 1] != IGNORE_INDEX:
            end += 1
        assert sample.input_ids[end] in specials, f"turn {k + 1}: the trained span does not end with a special token"
        span = sample.input_ids[len(prompt) : end + 1]
        assert sample.labels[len(prompt) : end + 1] == span
        claimed[owners[-1]].update(range(len(prompt), end + 1))
        # In its context: decoded on its own, a SentencePiece span would lose its leading space.
        answer = tokenizer.decode(sample.input_ids[: end + 1])[len(tokenizer.decode(prompt)) :]
        closing = tokenizer.convert_ids_to_tokens(span[-1])
        body = answer[: -len(closing)]
        whole = render_text(tokenizer, messages[: k + 1], False, tools)
        try:
            following = render_text(tokenizer, [*messages[: k + 1], {"role": "user", "content": "ping"}], False, tools)
        except TemplateError:  # a template that wants a tool result after a tool call
            following = ""
        # A template that renders no closing token of its own: the next turn's opening token, or else EOS.
        closes = closing in whole[len(prompt_text) :] or closing in following[len(whole) :]
        assert closes or closing == tokenizer.eos_token, (k + 1, answer)
        differs |= not closes
        if whole.startswith(prompt_text):
            # Exactly the template's text of the turn; a prompt ending in whitespace the turn lacks is the one gap.
            rendered = whole[len(prompt_text) :]
            assert any(text.startswith(body) for text in (rendered, rendered.lstrip())), (k + 1, answer, rendered)
        else:
            differs = True
            # The prompt opened a <think> block that the rendering drops (reasoning, closing tag and answer follow
            # it), or differs before the answer (Mistral's system message, Gemma 4's empty thought block): the
            # content onward as rendered.
            assert "</think>" in answer or body.strip() in whole, (k + 1, answer)
            if "</think>" not in answer:
                # Never from inside the template's own text of the turn (Gemma 4's "<|tool_call>call:" before a
                # call): the trained text starts after a token, a tag or a line break of the rendering.
                lead = whole[: whole.rfind(body.strip())]
                assert lead.endswith((*tokenizer.all_special_tokens, ">")) or lead[-1:].isspace(), (k + 1, answer)
        visible = messages[k]["content"].split("</think>")[-1].strip()
        assert visible in answer, (k + 1, answer)
    for i, sample in enumerate(samples):
        trained = {p for p, label in enumerate(sample.labels) if label != IGNORE_INDEX}
        assert trained == claimed[i], f"sample {i + 1}: positions {sorted(trained - claimed[i])} trained outside any turn"
    if len(samples) == 1 and not differs and not kwargs.get("max_length"):
        whole = render_text(tokenizer, messages, False, tools)
        if samples[0].differs != "boundary":  # the whole text's ids, and a closing token the template lacks
            assert samples[0].input_ids[: len(tokens(whole))] == tokens(whole), "one sample, not the whole text"
        assert tokenizer.decode(samples[0].input_ids).startswith(whole), "one sample, not the whole text"
    return len(samples)
