"""Render conversations with the tokenizer's own chat template and mark the tokens to train on.

Pure functions on a tokenizer, no model and no Lightning. One path serves training, validation,
prediction, chat and export, so the text a model is trained on and the text it is prompted with at
inference can never drift apart.

Masking works with any template, with or without ``{% generation %}`` markers: each assistant turn is found by
rendering the conversation before it with ``add_generation_prompt=True`` (the inference prompt) and the
conversation up to it; the supervised span is what follows the prompt up to and including the special token
that closes the turn (see :func:`training_samples`). A template for which this is not well defined raises
:class:`TemplateError` rather than producing a silent all-zero mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from os.path import commonprefix
from typing import Callable, Literal, NamedTuple, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sft_lightning import render_once
from sft_lightning.encoding import Encoder, Offsets, Pieces, any_of
from sft_lightning.errors import TemplateError, loading

IGNORE_INDEX = -100
TrainOn = Literal["assistant", "last", "all"]
# A leading system message under a template without a system role (Gemma 2): merged into the first user turn, or
# an error.
SystemMessage = Literal["auto", "error"]

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
    # Why the sample's ids are not the whole conversation tokenised at once: "history", the template renders
    # earlier turns differently inside later prompts (Qwen3 and DeepSeek-R1 drop their reasoning, Mistral moves the
    # system message), so each assistant turn is a sample of its own; "boundary", the text is the same but a token
    # merges across a prompt/answer boundary when the whole text is tokenised at once (one sample per turn when it
    # falls inside a later prompt).
    differs: Literal["", "history", "boundary"] = ""

    @property
    def supervised_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer through ``from_pretrained`` and make it ready for chat rendering: a template-less one gets
    the ChatML template and its two special tokens, one without a pad token pads with its EOS.

    The CLI loads it once and hands the same object to the model and the data (their ``connect``)."""
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


def render_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool,
    tools: list[dict] | None = None,
    system_message: SystemMessage = "auto",
) -> str:
    """The template's text for ``messages`` (and the function schemas ``tools``). Under a template without a system
    role (Gemma 2) a system message is merged into the first user turn, as such models are prompted (``auto``,
    see :func:`merge_system_message`), or is an error (``error``)."""
    options = {"tokenize": False, "add_generation_prompt": add_generation_prompt, "tools": tools}
    try:
        return tokenizer.apply_chat_template(messages, **options)
    except Exception as err:  # jinja raises whatever the template author chose
        merged = merge_system_message(messages)
        if merged is not messages and system_message == "error" and not has_system_role(tokenizer):
            raise TemplateError(
                "the chat template has no system role; data.system_message auto merges it into the first user turn"
            ) from None
        if merged is not messages:
            try:
                return tokenizer.apply_chat_template(merged, **options)
            except Exception:
                pass
        raise TemplateError(f"the chat template failed to render: {err}") from None


def has_system_role(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the template renders a system message at all (Gemma 2's raises)."""
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    try:
        tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:
        return False
    return True


def merge_system_message(messages: list[dict]) -> list[dict]:
    """A leading system message as the start of the first user turn (``system + "\n\n" + user``); the same list
    when there is nothing to merge."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return messages
    first_user = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [first_user, *messages[2:]]


def render_prompt(
    messages: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    tools: list[dict] | None = None,
    system_message: SystemMessage = "auto",
    split_special_tokens: bool = False,
) -> list[int]:
    """Ids of a conversation that ends with a user turn (or tool results), followed by the assistant generation
    prompt: exactly what ``generate`` is given at inference, and the start of the training ids of the next turn.
    ``split_special_tokens``: see :func:`training_samples`."""
    specials = _special_tokens(tokenizer)
    if not split_special_tokens:
        _refuse_special_text(messages, specials)
    encode = Encoder.of(messages, Pieces(tokenizer), specials.texts, split_special_tokens)
    return encode(render_text(tokenizer, messages, True, tools, system_message))[0]


def _refuse_special_text(messages: list[dict], specials: "_Specials") -> None:
    for index, message in enumerate(messages):
        if specials.pattern.search(message["content"]):  # one scan; then which text it is, as the texts are ordered
            inside = next(token for token in specials.texts if token in message["content"])
            raise TemplateError(
                f"message {index + 1} contains the text of the special token {inside!r}, which the tokenizer would "
                "read as the token itself: remove it, or set data.split_special_tokens true to train it as plain text"
            )


def training_samples(
    messages: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    train_on: TrainOn = "assistant",
    max_length: int | None = None,
    tools: list[dict] | None = None,
    system_message: SystemMessage = "auto",
    split_special_tokens: bool = False,
) -> list[RenderedSample]:
    """The samples ``fit`` trains on for one conversation (``data check`` shows the same).

    Each assistant turn is trained on exactly what the model sees at inference: its prompt is the template's own
    rendering of the messages before it with ``add_generation_prompt=True``, tokenised on its own as ``generate``
    gets it, followed by what the template renders for the turn up to and including its end-of-turn token
    (a ``<think>`` block the template renders for the turn included). Where every turn's prompt and answer are
    the start of the next turn's prompt, token for token (ChatML, Llama 3, Mistral), the conversation is one
    sample with every turn trained; where the template rewrites earlier turns (Qwen3 and DeepSeek-R1 drop
    earlier reasoning) or a boundary tokenises differently inside a longer text, each assistant turn becomes a
    sample of its own. ``train_on``: ``assistant`` every assistant turn, ``last`` the final one, ``all`` every
    token of the whole rendered conversation but the first. Samples longer than ``max_length`` keep their first
    ``max_length`` tokens. ``tools``: the function schemas the conversation may call; an assistant turn's
    ``tool_calls`` are trained as the template renders them, tool results never. ``system_message``: see
    :func:`render_text`. A message whose content holds the text of a special token (``<|im_end|>``) is an error,
    as the tokenizer would read the token itself; ``split_special_tokens`` reads such text as plain text instead.
    """
    [result] = training_samples_batch([(messages, tools)], tokenizer, train_on, max_length, system_message,
                                      split_special_tokens)
    if isinstance(result, TemplateError):
        raise result
    return result


def training_samples_batch(
    conversations: Sequence[tuple[list[dict], list[dict] | None]],
    tokenizer: PreTrainedTokenizerBase,
    train_on: TrainOn = "assistant",
    max_length: int | None = None,
    system_message: SystemMessage = "auto",
    split_special_tokens: bool = False,
    once: bool = True,
) -> list[list[RenderedSample] | TemplateError]:
    """:func:`training_samples` of each ``(messages, tools)``, or the :class:`TemplateError` it raises: the same
    samples, with the texts of all the conversations tokenised together (each distinct piece once, in one call).
    ``once``: cut each turn's texts from one rendering of the conversation where the template allows it
    (:mod:`~sft_lightning.render_once`); False renders every turn's prompt, the reference that way is tested against."""
    specials, pieces = _special_tokens(tokenizer), Pieces(tokenizer)
    added = tuple(pieces.added)
    renders = [_PrefixRenders(messages, partial(render_text, tokenizer, tools=tools, system_message=system_message))
               for messages, tools in conversations]
    found, direct = None, None
    if once and added:
        probe = partial(render_text, tokenizer, tools=None, system_message=system_message)
        found, direct = render_once.plan(tokenizer, probe, added, system_message)
    marks = any_of((*added, *render_once.REASONING_MARKS))
    cut: dict[int, tuple[str, dict]] = {}  # conversation -> (its rendering, its turns' texts cut from it)
    for index, ((messages, tools), render) in enumerate(zip(conversations, renders)):
        if found and train_on != "all" and render_once.plain(messages, tools, marks):
            try:
                whole = render.done[(len(messages), False)] = (direct or render)(messages, False)
                texts = render_once.prefix_texts(messages, whole, found)
            except TemplateError:
                continue
            if texts:
                render.done.update(texts)
                cut[index] = whole, texts
    # Read off the whole conversation's ids (where the pieces are the tokenizer's own cut), a conversation with its
    # turns' texts cut needs only the whole one's pieces.
    read_off = cut if pieces.cut is not None else {}
    pieces.prefetch(text for index, ((messages, _), render) in enumerate(zip(conversations, renders))
                    for text in ((read_off[index][0],) if index in read_off else _texts(messages, render, train_on)))
    results = []
    for index, ((messages, tools), render) in enumerate(zip(conversations, renders)):
        try:
            if not split_special_tokens:
                _refuse_special_text(messages, specials)
            encode = Encoder.of(messages, pieces, specials.texts, split_special_tokens)
            samples = None
            if index in read_off and not encode.literals:
                samples = _read_off(messages, *read_off[index], encode, specials, train_on, max_length)
            results.append(samples or _samples(messages, tools, encode, specials, render, train_on, max_length,
                                               system_message))
        except TemplateError as err:
            results.append(err)
    return results


def _read_off(messages: list[dict], whole: str, texts: dict[tuple[int, bool], str], encode: Encoder,
              specials: _Specials, train_on: TrainOn, max_length: int | None) -> list[RenderedSample] | None:
    """What :func:`_samples` gives a conversation whose turns' texts are all prefixes of ``whole`` (``texts``, see
    :func:`render_once.prefix_texts`), read off the ids of ``whole`` instead of assembled turn by turn: each trained
    turn's prompt ids start them, its answer runs from there to the first special token, which is the first special
    text after its content. None where any of that does not hold (a boundary that tokenises differently, content that
    ends in a special token's text), for _samples to decide as it always does, with the same result where it holds.
    """
    ids, offsets = encode(whole)
    labels = [IGNORE_INDEX] * len(ids)
    turns = _trained_turns(messages, train_on)
    for k in turns:
        prompt_end, through = len(texts[(k, True)]), len(texts[(k + 1, False)])
        prompt = encode.prefix_ids(texts[(k, True)])
        start = len(prompt)
        # _samples' _continuation: the prompt's ids start the text's, no token merges across the boundary.
        if ids[:start] != prompt:
            return None
        # _turn's end-of-turn token: the first special one after the content, within the turn's text.
        anchor = prompt_end + _content_end(whole[prompt_end:through], messages[k])
        found = specials.pattern.search(whole, prompt_end)
        end = next((t for t in range(start, len(ids)) if ids[t] in specials.ids), None)
        if found is None or end is None or not anchor <= found.start() == offsets[end][0] < through:
            return None
        visible = _visible(messages[k]["content"])
        if visible and not whole[prompt_end : found.start()].rstrip().endswith(visible):
            return None  # _turn raises its error
        labels[start : end + 1] = ids[start : end + 1]
    return [_cut(ids, labels, max_length)] if turns else None


def _trained_turns(messages: list[dict], train_on: TrainOn) -> list[int]:
    """The assistant messages whose turns are trained: every one, the last one, or none under ``all`` (which
    trains the whole text instead of turns)."""
    turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"] if train_on != "all" else []
    return turns[-1:] if train_on == "last" else turns


def _texts(messages: list[dict], render, train_on: TrainOn) -> list[str]:
    """The texts :func:`_samples` tokenises for ``messages`` when nothing is unusual: the conversation, and each
    trained turn's prompt and the conversation up to it (the template's errors are raised later, by _samples)."""
    turns = _trained_turns(messages, train_on)
    try:
        return [render(messages, False)] + [render(messages[:t + k], k == 0) for t in turns for k in (0, 1)]
    except TemplateError:
        return []


def _samples(messages, tools, encode: Encoder, specials: _Specials, render, train_on: TrainOn, max_length: int | None,
             system_message: SystemMessage) -> list[RenderedSample]:
    tokenizer = encode.tokenizer
    whole = render(messages, False)
    encode(whole)  # first, so that the turns' prompts, its prefixes under most templates, take over its ids
    if tools and _ignores_tools(tokenizer, messages, whole, system_message):
        raise TemplateError(
            "the chat template ignores 'tools' (it does not render function schemas): leave 'tools' out and describe "
            "the functions in the system message, or use a model whose template renders them"
        )
    if train_on == "all":
        ids = encode(whole)[0]
        return [_cut(ids, [IGNORE_INDEX] + ids[1:], max_length)]
    turns = _trained_turns(messages, train_on)
    parts = [_turn(messages, turn, encode, specials, render) for turn in turns]
    if not _one_sample(parts):
        same_text = all(later.text.startswith(part.text) for part, later in zip(parts, parts[1:]))
        reason = "boundary" if same_text else "history"
        return [
            _cut(part.prompt + part.answer, [IGNORE_INDEX] * len(part.prompt) + part.answer, max_length, reason)
            for part in parts
        ]
    last = parts[-1]
    ids, labels = last.prompt + last.answer, [IGNORE_INDEX] * len(last.prompt) + last.answer
    for part in parts[:-1]:
        labels[len(part.prompt) : len(part.prompt) + len(part.answer)] = part.answer
    # What the template renders after the last trained turn (a newline, later turns), never trained: with it the
    # ids equal apply_chat_template of the whole conversation.
    differs = ""
    if whole.startswith(last.text):
        tail = _continuation(encode, specials, last.text, ids, whole[len(last.text) :])[0]
        ids, labels = ids + tail, labels + [IGNORE_INDEX] * len(tail)
        differs = "" if ids == encode(whole)[0] else "boundary"
    return [_cut(ids, labels, max_length, differs)]


class _PrefixRenders:
    """``render(shown, add_generation_prompt)`` done once for each prefix of ``messages`` (a template renders the same
    text for the same messages; the last turn's conversation is the whole one, rendered again otherwise); any other
    list (a probe turn appended) is rendered each time. ``done`` may be given texts cut from one rendering
    (:mod:`~sft_lightning.render_once`), keyed ``(len(shown), add_generation_prompt)``."""

    def __init__(self, messages: list[dict], render: Callable[[list[dict], bool], str]):
        self.messages, self.render = messages, render
        self.done: dict[tuple[int, bool], str] = {}

    def __call__(self, shown: list[dict], add_generation_prompt: bool) -> str:
        if len(shown) > len(self.messages) or any(a is not b for a, b in zip(shown, self.messages)):
            return self.render(shown, add_generation_prompt)
        key = (len(shown), add_generation_prompt)
        if key not in self.done:
            self.done[key] = self.render(shown, add_generation_prompt)
        return self.done[key]


def _ignores_tools(tokenizer, messages: list[dict], whole: str, system_message: SystemMessage) -> bool:
    """Whether the template renders the conversation the same without its tools (a tool-use-only template, such
    as Hermes 2 Pro's, fails without them: it does render them)."""
    try:
        return whole == render_text(tokenizer, messages, False, system_message=system_message)
    except TemplateError:
        return False


class _Turn(NamedTuple):
    prompt: list[int]  # the inference prompt's ids
    answer: list[int]  # the trained ids, up to and including the end-of-turn token
    text: str  # the text that prompt and answer render


def _one_sample(parts: list[_Turn]) -> bool:
    """Whether each turn's prompt and answer ids start the next turn's prompt ids."""
    return all(
        later.prompt[: len(part.prompt) + len(part.answer)] == part.prompt + part.answer
        for part, later in zip(parts, parts[1:])
    )


def _cut(ids: list[int], labels: list[int], max_length: int | None, differs: str = "") -> RenderedSample:
    truncated = max_length is not None and len(ids) > max_length
    return RenderedSample(ids[:max_length], labels[:max_length], truncated, differs)


def _turn(messages, turn: int, encode: Encoder, specials: _Specials, render) -> _Turn:
    """The inference prompt and the trained answer of assistant message ``turn``."""
    message = messages[turn]
    content = message["content"]
    tokenizer = encode.tokenizer
    prompt, whole = render(messages[:turn], True), render(messages[: turn + 1], False)
    opened = not whole.startswith(prompt)
    before = messages[turn - 1]["content"] if turn else ""
    answer_text = _diverging_answer(prompt, whole, message, turn, specials, before) if opened else whole[len(prompt) :]
    # The turn ends at the first special token after its content (or its last tool call): special tokens before
    # it belong to the answer (gpt-oss's <|channel|>final<|message|>, Mistral's [TOOL_CALLS]).
    anchor = _content_end(answer_text, message)
    if _first_special(answer_text, specials, anchor) is None:
        answer_text = answer_text[:anchor] + _closing(messages, turn, whole, tokenizer, specials, render)
    prompt_ids = encode(prompt)[0]
    answer, offsets = _continuation(encode, specials, prompt, prompt_ids, answer_text)
    end = next(t for t, token_id in enumerate(answer) if token_id in specials.ids and offsets[t][0] >= anchor)
    rendered = answer_text[: offsets[end][0]]
    first = next((t for t, token_id in enumerate(answer) if token_id in specials.ids), end)
    if first < end and render(messages[:turn], False) == prompt and _opens_turns(tokenizer, prompt, messages[:turn], answer[first]):
        raise TemplateError(
            f"the chat template renders the assistant header with message {turn + 1} ({answer_text[:40]!r}), not in "
            "its generation prompt (add_generation_prompt adds nothing), so the model would have to write its own header"
        )
    calls = _call_names(message)
    if any(name not in rendered for name in calls):
        raise TemplateError(f"the chat template does not render the tool_calls of message {turn + 1} (it has no tool support)")
    visible = _visible(content)
    if calls and visible not in rendered:
        raise TemplateError(f"the chat template does not render the content of message {turn + 1} beside its tool_calls")
    if not calls and not opened and visible and not rendered.rstrip().endswith(visible):
        raise TemplateError(
            f"the chat template renders more than the content between the generation prompt and the end-of-turn "
            f"token of message {turn + 1}: {rendered[:80]!r}"
        )
    return _Turn(prompt_ids, answer[: end + 1], prompt + answer_text[: offsets[end][1]])


def _continuation(
    encode: Encoder, specials: _Specials, prefix: str, prefix_ids: list[int], text: str
) -> tuple[list[int], Offsets]:
    """The ids (and offsets into ``text``) of ``text`` as it is tokenised after ``prefix``, not as text of its own: a
    SentencePiece tokenizer (Metaspace, ``prepend_scheme="first"``: Mistral, Phi-3) gives text of its own a leading
    "▁" (a space) that the template does not render. Where a token would merge across the boundary (the prefix's ids
    are not the start of the whole's), ``text`` as it is tokenised after a special token: still no leading "▁"."""
    ids, offsets = encode(prefix + text)
    if ids[: len(prefix_ids)] == prefix_ids:
        skip, shift = len(prefix_ids), len(prefix)
    else:
        anchor = specials.texts[0]  # one id, and nothing merges across it
        (ids, offsets), skip, shift = encode(anchor + text), 1, len(anchor)
    return ids[skip:], offsets.after(skip, shift)


def _visible(content: str) -> str:
    """The answer part of a message's content: after its reasoning block, which templates render apart or drop."""
    return content.split("</think>")[-1].strip()


def _call_names(message: dict) -> list[str]:
    """The functions an assistant message calls, in order."""
    return [call["function"]["name"] for call in message.get("tool_calls") or ()]


def _first_special(text: str, specials: _Specials, start: int = 0) -> tuple[int, str] | None:
    """(position, text) of the first special token in ``text`` from ``start``; None when there is none."""
    found = specials.pattern.search(text, start)  # what min((position, text)) over the texts would give
    return (found.start(), found.group()) if found else None


def _is_block(text: str, specials: _Specials) -> bool:
    """Whether ``text`` starts and ends with a special token (a block opened and closed: ``<|channel>...<channel|>``)."""
    return len(text) > 1 and text.startswith(specials.texts) and text.endswith(specials.texts)


def _content_end(answer_text: str, message: dict) -> int:
    """Where the message's content (or, without content, its last tool call's name) ends in its rendered text."""
    calls = _call_names(message)
    marks = [mark for mark in (_visible(message["content"]), *calls[-1:]) if mark and mark in answer_text]
    return max((answer_text.rfind(mark) + len(mark) for mark in marks), default=0)


def _closing(messages, turn: int, whole: str, tokenizer, specials: _Specials, render) -> str:
    """The end of a turn that the template does not close with a special token of its own.

    GLM-4 renders nothing after an answer; the next turn's opening token (``<|user|>``) ends it, and is among the
    model's stop tokens: it is trained, with whatever the template renders before it. A template without any
    special token between turns (plain ``User:``/``Assistant:`` formats) gets the tokenizer's EOS token after the
    answer, as generation needs a token to stop at; such a turn is not the start of the next turn's prompt, so the
    conversation becomes one sample per turn.
    """
    try:
        following = render([*messages[: turn + 1], {"role": "user", "content": "ping"}], False)
    except TemplateError:  # a template that wants a tool result after a tool call, say
        following = ""
    found = _first_special(following, specials, len(whole)) if following.startswith(whole) else None
    if found is not None:
        position, token = found
        return following[len(whole) : position + len(token)]
    if tokenizer.eos_token is None:
        raise TemplateError(
            f"the assistant message {turn + 1} is not closed by a special end-of-turn token, and the tokenizer has no "
            "EOS token to close it with"
        )
    return tokenizer.eos_token


def _opens_turns(tokenizer, prompt: str, before: list[dict], token_id: int) -> bool:
    """Whether the special token is part of the header in front of the last message before the turn (a role
    header such as ``<|im_start|>``), rather than the start of an answer (Cohere's ``<|START_THINKING|>``)."""
    content = before[-1]["content"] if before else ""
    position = prompt.rfind(content) if content else len(prompt)
    # The header: what the template renders in front of the message's content.
    return tokenizer.convert_ids_to_tokens(token_id) in prompt[max(position - 64, 0) : position]


def _diverging_answer(prompt: str, whole: str, message: dict, turn: int, specials: _Specials, before: str = "") -> str:
    """The answer text after a generation prompt that the rendered conversation does not continue.

    - The prompt only ends with whitespace the rendered turn lacks (templates kept with their line breaks): the
      rendered answer follows it.
    - The prompt opens a block (DeepSeek-R1, QwQ: ``<think>\n``) that the template drops from the rendered answer; at
      inference the model continues inside it. The trained text is the turn's reasoning, the block's closing tag
      and the answer, as the template renders it: the content itself when it starts with the opening
      (``<think>\n...\n</think>\n\nanswer``), else ``reasoning_content`` (empty when absent, as Qwen3 writes a turn
      without reasoning) in the same layout.
    - Otherwise the prompt differs before the answer (Mistral v0.3 puts the system message, and its tools, into the
      latest user turn only; Gemma 4 opens and closes an empty thought block in the prompt). Where the rendering
      continues the last message before the turn (``before``) with the prompt's own generation suffix
      (``[/INST]``), the answer is what follows that suffix; else the content onward, as the template renders it.
      Never the first mention of a called function's name: that may be inside the tool schemas.
    """
    shared = len(commonprefix([prompt, whole]))
    # Back to a line or tag boundary, so that "<think>" against "<tool_call>" does not leave "hink>".
    shared = max(prompt.rfind(">", 0, shared), prompt.rfind("\n", 0, shared)) + 1 if shared < len(prompt) else shared
    opening, rendered = prompt[shared:], whole[shared:]
    if not opening.strip():
        return rendered.lstrip()
    content = message["content"]
    tag = re.fullmatch(r"<(\w+)>", opening.strip())
    if tag and content.startswith(opening):
        closing = _first_special(rendered, specials)
        return content[len(opening) :] + rendered[closing[0] if closing else len(rendered) :]
    if tag:
        reasoning = (message.get("reasoning_content") or "").strip("\n")
        # The line breaks the template puts before the answer go (the layout gives its own); an answer's own leading
        # spaces stay, as the template renders them.
        return ("" if opening.endswith("\n") else "\n") + f"{reasoning}\n</{tag[1]}>\n\n{rendered.lstrip(chr(10))}"
    if before and before in prompt and before in whole:
        suffix = prompt[prompt.rfind(before) + len(before) :]
        after_before = whole.rfind(before) + len(before)
        if suffix.strip() and whole.startswith(suffix, after_before):
            return whole[after_before + len(suffix) :]
    if _is_block(opening.strip(), specials) and not rendered.startswith(tuple(t for t in specials.texts if t in opening)):
        # The prompt opens and closes a block that the rendering lacks (Gemma 4's empty thought channel) and the
        # rendering goes on with the turn, not with a header the prompt has too (Mistral's [INST], Command-R's
        # <|CHATBOT_TOKEN|>): the turn as rendered starts where the two part, template text before a tool call
        # included ("<|tool_call>call:").
        return rendered
    visible = _visible(content)
    calls = _call_names(message)
    start = None
    if visible and visible in rendered:
        start = whole.rfind(visible)
    elif not visible and calls:
        # A tool call: its first function's name after the last message before the turn (tool schemas, which name
        # it too, come before that), from the special tokens that open it (Mistral's [TOOL_CALLS], Gemma 4's
        # <|tool_call>).
        floor = max(shared, whole.rfind(before) + len(before) if before and before in whole else shared)
        found = whole.find(calls[0], floor)
        start = None if found < 0 else found
        while start is not None and (opening := [t for t in specials.texts if whole.endswith(t, floor, start)]):
            start -= len(opening[0])
    if start is not None:
        answer = whole[start:]
        closing = _first_special(answer, specials, _content_end(answer, message))
        if closing is not None and answer[closing[0] :].strip() not in specials.texts:
            raise TemplateError(
                f"the chat template renders message {turn + 1} inside the conversation, followed by "
                f"{answer[closing[0] :][:60]!r}, not after its generation prompt: it cannot be trained as inference sees it"
            )
        return answer
    raise TemplateError(
        f"the chat template's generation prompt ends with {opening!r}, which its rendering of message {turn + 1} "
        f"does not contain: give that turn's content as the model continues the prompt, starting with {opening!r}"
    )


class _Specials(NamedTuple):
    """The special tokens, the ones that may end a turn: their texts (to find in content) and ids (to find in ids)."""

    texts: tuple[str, ...]
    ids: frozenset[int]
    # Any of the texts, in one scan (Llama 3 has 256): at a position, the alphabetically first text that starts there.
    pattern: re.Pattern


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> _Specials:
    by_text = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens} | {
        token.content: i for i, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return _Specials(tuple(by_text), frozenset(by_text.values()), any_of(sorted(by_text)))


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn (``<|im_end|>``, ``<|eot_id|>``, ...), found by masking a probe."""
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    labels = training_samples(probe, tokenizer)[0].labels
    return [label for label in labels if label != IGNORE_INDEX][-1]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end generation: the end-of-turn token first, then the tokenizer's eos if different."""
    ids = [end_of_turn_token_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
