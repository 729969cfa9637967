"""Render conversations with the tokenizer's own chat template and mark the tokens to train on.

Pure functions on a tokenizer, no model and no Lightning. One path serves training, validation,
prediction, chat and export, so the text a model is trained on and the text it is prompted with at
inference can never drift apart.

Masking works with any template, with or without ``{% generation %}`` markers: the whole conversation is
rendered and tokenised once (so the ids equal ``apply_chat_template``), and each assistant turn is located
by rendering the conversation before it with ``add_generation_prompt=True``; the supervised span runs from
the end of that prompt up to and including the special token that closes the turn. A template for which
this is not well defined raises :class:`TemplateError` rather than producing a silent all-zero mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sft_lightning.errors import TemplateError, loading

IGNORE_INDEX = -100
TrainOn = Literal["assistant", "last", "all"]

# Used when a tokenizer has no template of its own (most base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class RenderedSample:
    input_ids: list[int]
    labels: list[int]  # the input id where trained, IGNORE_INDEX elsewhere; shifted inside the loss
    truncated: bool = False

    @property
    def supervised_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@lru_cache(maxsize=8)
def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer through ``from_pretrained`` and make it ready for chat rendering.

    Cached so the data module and the model share one object (and one ChatML fallback) per process.
    """
    with loading(path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise TemplateError(f"{path}: a fast tokenizer is needed to map template text to tokens exactly")
    if not tokenizer.chat_template:
        tokenizer.add_special_tokens({"additional_special_tokens": CHATML_SPECIAL_TOKENS})
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        # Any id will do: padding is masked by position in the collator, never by comparing ids.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises whatever the template author chose
        raise TemplateError(f"the chat template failed to render: {err}") from None


def render_prompt(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of a conversation that ends with a user turn, followed by the assistant generation prompt."""
    text = render_text(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_conversation(
    messages: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    train_on: TrainOn = "assistant",
    max_length: int | None = None,
) -> RenderedSample:
    """Token ids of the whole conversation and labels that supervise only what ``train_on`` selects.

    ``assistant``: each assistant message's content and the end-of-turn token closing it;
    ``last``: the same for the final assistant message only; ``all``: every token but the first, which
    nothing precedes. Conversations longer than ``max_length`` keep their first ``max_length`` tokens.
    """
    text = render_text(tokenizer, messages, add_generation_prompt=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    if train_on == "all":
        labels = [IGNORE_INDEX] + input_ids[1:]
    else:
        labels = [IGNORE_INDEX] * len(input_ids)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        specials = _special_token_ids(tokenizer)
        for turn in turns[-1:] if train_on == "last" else turns:
            first, last = _assistant_token_span(messages, turn, tokenizer, text, input_ids, offsets, specials)
            labels[first : last + 1] = input_ids[first : last + 1]
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return RenderedSample(input_ids, labels, truncated)


def _assistant_token_span(messages, turn, tokenizer, text, input_ids, offsets, specials) -> tuple[int, int]:
    """Indices of the first and last supervised token of assistant message ``turn``."""
    prompt = render_text(tokenizer, messages[:turn], add_generation_prompt=True)
    if prompt == render_text(tokenizer, messages[:turn], add_generation_prompt=False):
        raise TemplateError("the chat template ignores add_generation_prompt, so the assistant header cannot be told apart")
    if not text.startswith(prompt):
        raise TemplateError(
            f"the chat template is not prefix-stable: the prompt before message {turn + 1} renders differently "
            "inside the whole conversation"
        )
    start = len(prompt)
    # A token straddling the prompt boundary carries content characters, so it is trained.
    first = next((t for t, (_, end) in enumerate(offsets) if end > start), None)
    last = next((t for t in range(first or 0, len(input_ids)) if input_ids[t] in specials), None)
    if first is None or last is None:
        raise TemplateError(f"the assistant message {turn + 1} is not closed by a special end-of-turn token")
    rendered = text[start : offsets[last][0]]
    if rendered.strip() != messages[turn]["content"].strip():
        raise TemplateError(
            f"the chat template renders more than the content between the generation prompt and the "
            f"end-of-turn token of message {turn + 1}: {rendered[:80]!r}"
        )
    return first, last


def _special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn (``<|im_end|>``, ``<|eot_id|>``, ...), found by masking a probe."""
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    labels = render_conversation(probe, tokenizer).labels
    return [label for label in labels if label != IGNORE_INDEX][-1]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end generation: the end-of-turn token first, then the tokenizer's eos if different."""
    ids = [end_of_turn_token_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
