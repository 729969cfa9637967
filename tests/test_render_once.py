"""Preparation at scale gives exactly the samples of rendering turn by turn: texts cut from one rendering per
conversation (:mod:`sft_lightning.render_once`) and ids assembled from pieces between added tokens
(:mod:`sft_lightning.encoding`), on the 132 real templates with byte-level and SentencePiece tokenizers."""

from functools import partial

import pytest
from tokenizers import AddedToken

from sft_lightning import render_once
from sft_lightning.encoding import Pieces, cuts_exactly
from sft_lightning.render import render_text, training_samples_batch
from tests.conftest import CHATML_TEMPLATE, word_tokenizer
from tests.template_check import CONVERSATIONS, TOOL_CONVERSATIONS, TOOLS, real_template_tokenizer, real_templates
from tests.test_real_templates import SENTENCEPIECE

TEMPLATES = real_templates()
# Answers that end in what the end-of-turn token's text holds: the last place the content is found is inside that
# token, so the turn is read as rendering turn by turn reads it, not off the whole conversation's ids.
INSIDE_THE_END = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": name}]
                  for name in ("im_end", "eot_id", "end_of_turn", "/s", "|end|")]
BATCH = ([(messages, None) for messages in [*CONVERSATIONS.values(), *INSIDE_THE_END]]
         + [(messages, TOOLS) for messages in TOOL_CONVERSATIONS])
# Families that render history as it was: their plain conversations take one rendering each.
RENDERED_ONCE = ["Qwen--Qwen2.5-3B-Instruct.jinja", "meta-llama--Llama-3.1-8B-Instruct.jinja",
                 "google--gemma-3-1b-it.jinja"]
# Templates that rewrite earlier turns (reasoning dropped) must never take it.
REWRITES_HISTORY = ["Qwen--Qwen3-1.7B.jinja", "deepseek-ai--DeepSeek-R1.jinja"]


def layout_of(tokenizer):
    render = partial(render_text, tokenizer, tools=None, system_message="auto")
    return render_once.layout(render, tuple(Pieces(tokenizer).added))


def same_as_turn_by_turn(tokenizer) -> None:
    once = training_samples_batch(BATCH, tokenizer)
    turn_by_turn = training_samples_batch(BATCH, tokenizer, once=False)
    for (messages, _), fast, reference in zip(BATCH, once, turn_by_turn):
        assert repr(fast) == repr(reference), messages  # samples, or the same error


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_one_rendering_gives_the_samples_of_rendering_turn_by_turn(name):
    tokenizer = real_template_tokenizer(name, *TEMPLATES[name])
    same_as_turn_by_turn(tokenizer)
    for messages, tools in BATCH:  # every text the turns need, assembled from pieces, is the tokenizer's own
        for text in {render_text(tokenizer, messages[:k], k < len(messages), tools) for k in range(1, len(messages) + 1)
                     if _renders(tokenizer, messages[:k], tools)}:
            expected = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets, _ = Pieces(tokenizer).encode(text)
            assert (ids, list(offsets)) == (expected["input_ids"], expected["offset_mapping"])


def _renders(tokenizer, messages, tools) -> bool:
    try:
        render_text(tokenizer, messages, True, tools)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("name", sorted(SENTENCEPIECE))
def test_one_rendering_with_a_sentencepiece_tokenizer_gives_the_same_samples(name):
    tokenizer = real_template_tokenizer(name, *TEMPLATES[name], sentencepiece=True)
    same_as_turn_by_turn(tokenizer)


def test_templates_that_keep_history_are_rendered_once_and_those_that_rewrite_it_are_not():
    taken = {name for name in TEMPLATES if layout_of(real_template_tokenizer(name, *TEMPLATES[name])) is not None}
    assert set(RENDERED_ONCE) <= taken and not taken & set(REWRITES_HISTORY)
    assert len(taken) >= 50, len(taken)  # 55 of the 132 on transformers 5.25
    for name in RENDERED_ONCE:  # rendered by the compiled template itself, as apply_chat_template renders the probes
        tokenizer = real_template_tokenizer(name, *TEMPLATES[name])
        assert render_once.direct_renderer(tokenizer, partial(render_text, tokenizer, tools=None)) is not None


def test_pieces_fall_back_to_whole_texts_where_an_added_token_strips_whitespace(chatml_tokenizer):
    text = "<|im_start|>user\nHi <|im_end|>\n"
    assert cuts_exactly(chatml_tokenizer) and Pieces(chatml_tokenizer).cut is not None
    chatml_tokenizer.backend_tokenizer.enable_truncation(4096)  # pieces then go through tokenizer(), which lifts it
    ids, offsets, _ = Pieces(chatml_tokenizer).encode(text + "x <|im_start|>")
    expected = chatml_tokenizer(text + "x <|im_start|>", add_special_tokens=False, return_offsets_mapping=True)
    assert (ids, list(offsets)) == (expected["input_ids"], expected["offset_mapping"])
    chatml_tokenizer.add_tokens([AddedToken("<mark>", lstrip=True)])
    assert not cuts_exactly(chatml_tokenizer) and Pieces(chatml_tokenizer).cut is None
    text += "left of <mark> it"
    expected = chatml_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets, _ = Pieces(chatml_tokenizer).encode(text)
    assert (ids, list(offsets)) == (expected["input_ids"], expected["offset_mapping"])


def test_a_conversation_with_reasoning_is_rendered_turn_by_turn_even_where_plain_ones_are_not(chatml_tokenizer):
    # Plain conversations render message after message; reasoning is dropped from answers before the last one only.
    chatml_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}"
        "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert layout_of(chatml_tokenizer) is not None
    messages = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "<think>b a</think>a"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "a"}]
    [once], [turn_by_turn] = (training_samples_batch([(messages, None)], chatml_tokenizer, once=o) for o in (True, False))
    assert once == turn_by_turn and len(once) == 2  # one sample per turn: the first answer's reasoning is history


def test_special_texts_are_found_in_one_scan_as_by_searching_each():
    from sft_lightning.encoding import any_of
    from sft_lightning.render import _first_special, _Specials

    texts = ("<s>", "<s>x", "</s>", "<|a|>", "<|ab|>", "b")
    specials = _Specials(texts, frozenset(), any_of(sorted(texts)))
    for text in ("x<s>x</s>", "<|ab|><s>", "ab<|a|>", "none here", "<s><s>xb", "", "bb<s>x"):
        for start in range(len(text) + 1):
            found = [(text.find(token, start), token) for token in texts if token in text[start:]]
            assert _first_special(text, specials, start) == (min(found) if found else None), (text, start)
    assert any_of([]).search("any text") is None


def test_a_template_is_probed_once_and_again_when_it_changes(chatml_tokenizer, monkeypatch):
    probed, real = [], render_once.layout
    monkeypatch.setattr(render_once, "layout", lambda *args: probed.append(args) or real(*args))
    monkeypatch.setattr(render_once, "_PLANS", {})
    messages = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "b a"}]
    first = [training_samples_batch([(messages, None)], chatml_tokenizer) for _ in range(3)]
    assert len(probed) == 1 and first[0] == first[1] == first[2]
    chatml_tokenizer.chat_template = chatml_tokenizer.chat_template.replace("\\n", "\\n\\n")  # another template
    training_samples_batch([(messages, None)], chatml_tokenizer)
    training_samples_batch([(messages, None)], chatml_tokenizer, system_message="error")  # rendered another way
    assert len(probed) == 3


def test_conversations_a_template_renders_unlike_its_probes_are_read_turn_by_turn(chatml_tokenizer):
    # Read off the whole conversation's ids only where that gives what rendering turn by turn gives: not where the
    # template adds to one answer's content (an error), nor where the token after the content is not special.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye"},
                {"role": "user", "content": "how"}, {"role": "assistant", "content": "fine"}]
    chatml_tokenizer.chat_template = CHATML_TEMPLATE.replace("m['content']", "(m['content'] + (' thanks' if m['content'] == 'bye' else ''))")
    assert layout_of(chatml_tokenizer) is not None
    [once], [reference] = (training_samples_batch([(messages, None)], chatml_tokenizer, once=flag) for flag in (True, False))
    assert "renders more than the content" in str(reference) and repr(once) == repr(reference)
    plain = word_tokenizer(["<pad>", "<|im_start|>"], CHATML_TEMPLATE, eos_token="<pad>")
    plain.add_tokens(["<|im_end|>"])  # added, not special: the turn ends at the next special token
    assert layout_of(plain) is not None
    [once], [reference] = (training_samples_batch([(messages, None)], plain, once=flag) for flag in (True, False))
    assert not isinstance(reference, Exception) and repr(once) == repr(reference)
