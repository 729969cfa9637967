"""One rendering per conversation, where the template keeps history as it was: every turn's texts cut from it.

Masking needs, for each assistant turn, the template's inference prompt (the messages before it with
``add_generation_prompt=True``) and its rendering of the conversation up to the turn. Most templates (ChatML,
Llama 3, Mistral without a system message) render a conversation as one message after another, each the same
whatever follows it; the generation prompt is then a fixed text ``G`` (``<|im_start|>assistant\\n``) put after the
messages, and an answer is closed by a fixed text ``C`` (``<|im_end|>\\n``). Then every one of those texts is a
prefix of the one rendering of the whole conversation, ending just after the turn's ``G`` or its ``C``, and one
Jinja call per conversation does for all of them.

Whether a template is such (its :class:`Layout`) is decided once per template from probe conversations, each one
rendered turn by turn as well and required to give exactly the same texts. A conversation takes this way only when
it looks like the probes (system, user and assistant messages with plain content, no tools, no tool calls, no
reasoning fields, no text of an added token such as ``<think>``), and only when ``G`` and ``C`` are found where its
turns are; anything else is rendered turn by turn.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Optional

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text

PROBES = [
    [{"role": "user", "content": "Probe question one?"}, {"role": "assistant", "content": "Probe answer one."}],
    [{"role": "system", "content": "Probe system."}, {"role": "user", "content": "Probe question one?"},
     {"role": "assistant", "content": "Probe answer one."}, {"role": "user", "content": "Probe question two?"},
     {"role": "assistant", "content": "Probe answer\n\ntwo."}, {"role": "user", "content": "Probe question three?"},
     {"role": "assistant", "content": "Probe answer three."}],
    [{"role": "user", "content": " Probe  spaced\n"}, {"role": "assistant", "content": "\nProbe spaced answer \n"},
     {"role": "user", "content": "Probe last question"}],
]
PLAIN_ROLES = {"system", "user", "assistant"}
REASONING_MARKS = ("<think>", "</think>")  # templates that split reasoning out of an answer look for them


class Layout(NamedTuple):
    generation: str  # what add_generation_prompt puts after the messages
    closing: str  # what follows an answer's content, up to the next message


def layout(render: Render, added: tuple[str, ...]) -> Optional[Layout]:
    """The template's :class:`Layout` where it renders each probe message after message as described above; None
    otherwise. ``added``: the texts of the tokenizer's added tokens (``G`` and ``C`` must contain one, so that a
    message's content can never be mistaken for them)."""
    try:
        found = {_layout_of(probe, render) for probe in PROBES}
        if len(found) != 1 or None in found:
            return None
        (generation, closing), = found
        if not any(token in generation for token in added) or not closing.startswith(added):
            return None
        # Cut from the one rendering, every text is the template's own.
        for probe in PROBES:
            texts = prefix_texts(probe, render(probe, False), Layout(generation, closing))
            if texts is None or any(text != render(probe[:k], flag) for (k, flag), text in texts.items()):
                return None
    except Exception:  # a template that refuses a probe (no system role, say): turn by turn
        return None
    return Layout(generation, closing)


def _layout_of(probe: list[dict], render: Render) -> Optional[Layout]:
    """The layout one probe shows: None where its turns are not rendered one after another."""
    whole, found = render(probe, False), set()
    for k, message in enumerate(probe):
        if message["role"] != "assistant":
            continue
        before, prompt, through = render(probe[:k], False), render(probe[:k], True), render(probe[: k + 1], False)
        if not (prompt.startswith(before) and through.startswith(prompt) and whole.startswith(through)):
            return None
        answer = through[len(prompt) :]
        # The content as given, or trimmed (Llama 3's template trims it).
        content = next((text for text in (message["content"], message["content"].strip()) if answer.startswith(text)), None)
        if content is None:
            return None
        found.add(Layout(prompt[len(before) :], answer[len(content) :]))
    return found.pop() if len(found) == 1 else None


def plain(messages: list[dict], tools: Optional[list], marks: re.Pattern) -> bool:
    """Whether a conversation looks like the probes (see the module's docstring); ``marks`` finds the texts of the
    added tokens and of ``REASONING_MARKS``."""
    return tools is None and all(
        message.keys() <= {"role", "content"} and message["role"] in PLAIN_ROLES and not marks.search(message["content"])
        for message in messages
    )


def prefix_texts(messages: list[dict], whole: str, found: Layout) -> Optional[dict[tuple[int, bool], str]]:
    """The template's text of ``messages[:k]`` (with the generation prompt or not), keyed ``(k, flag)``, for each
    assistant turn ``k``, cut from ``whole``: its rendering. None where the layout's texts are not where the turns are."""
    generation, closing = found
    turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    starts, position = [], whole.find(generation)
    while position >= 0:
        starts.append(position)
        position = whole.find(generation, position + len(generation))
    if len(starts) != len(turns):
        return None
    texts = {}
    for n, (k, start) in enumerate(zip(turns, starts)):
        prompt_end = start + len(generation)
        texts[(k, False)], texts[(k, True)] = whole[:start], whole[:prompt_end]
        if k + 1 == len(messages):
            texts[(k + 1, False)] = whole
            continue
        close = whole.find(closing, prompt_end)
        if close < 0 or (n + 1 < len(starts) and close + len(closing) > starts[n + 1]):
            return None
        texts[(k + 1, False)] = whole[: close + len(closing)]
    return texts


# What plan() decided, by what the decision depends on: a template is probed once per process, not once per batch.
_PLANS: dict[tuple, tuple[Optional[Layout], bool]] = {}


def plan(tokenizer, render: Render, added: tuple[str, ...], system_message: str) -> tuple[Optional[Layout], Optional[Render]]:
    """The template's :func:`layout` and, where it has one, its :func:`direct_renderer`: probed once for each
    template, template variables (the special tokens), added tokens and ``system_message`` (what ``render``, the
    tokenizer's ``apply_chat_template`` without tools, renders with)."""
    key = (repr(tokenizer.chat_template), repr(sorted(tokenizer.special_tokens_map.items())), added, system_message)
    if key not in _PLANS:
        found = layout(render, added)
        _PLANS[key] = found, found is not None and direct_renderer(tokenizer, render) is not None
    found, direct = _PLANS[key]
    return found, direct_renderer(tokenizer, render, checked=True) if direct else None


def direct_renderer(tokenizer, render: Render, checked: bool = False) -> Optional[Render]:
    """The template's compiled Jinja called directly on plain conversations (see :func:`plain`), without
    ``apply_chat_template``'s conversion of rich inputs, which a plain conversation does not need (it is over half of
    the cost of a rendering); None unless it renders every probe exactly as ``render`` (``apply_chat_template``)
    does (``checked``: :func:`plan` found so already). A conversation it fails on is rendered by ``render``, which
    raises the template's error or merges a system message as usual."""
    try:
        # Private members of transformers (5.x): the template compiled as apply_chat_template compiles it (cached),
        # and the variables it hands the template, as it converts them.
        from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data

        compiled = _compile_jinja_template(tokenizer.get_chat_template())
        variables = _plain_template_data(dict(tokenizer.special_tokens_map))
    except Exception:
        return None

    def rendered(messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return compiled.render(messages=[dict(message) for message in messages], tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except Exception:
            return render(messages, add_generation_prompt)

    if checked:
        return rendered
    # The texts layout() renders: each probe, and before and through each of its assistant turns.
    shown = [(probe, False) for probe in PROBES] + [
        (probe[: k + plus], plus == 0) for probe in PROBES for k, message in enumerate(probe)
        if message["role"] == "assistant" for plus in (0, 1)]
    try:
        same = all(rendered(messages, flag) == render(messages, flag) for messages, flag in shown)
    except Exception:
        return None
    return rendered if same else None
