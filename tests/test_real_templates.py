"""Real chat templates of 128 published models (tests/templates/SOURCES.tsv names each one's source), each run on
edge conversations through :func:`training_samples` and checked by :mod:`tests.template_check`: every assistant
turn is trained on exactly what the template renders after its inference prompt, up to its end-of-turn token."""

import pytest

from sft_lightning.data_check import trained_spans
from sft_lightning.errors import TemplateError
from sft_lightning.render import training_samples
from tests.template_check import CONVERSATIONS, TOOL_CONVERSATIONS, TOOLS, check_conversation, real_template_tokenizer, real_templates

TEMPLATES = real_templates()
# Falcon-7B-Instruct's template strips blank lines out of a multi-line answer, so the content is not what it renders.
REFUSES = {("tiiuae--falcon-7b-instruct.jinja", "multiline")}
# Templates that render tools, one or more per family: the tool call must be trained (48 of the 132 are).
TRAINS_TOOL_CALLS = {
    "Qwen--Qwen2.5-3B-Instruct.jinja", "Qwen--Qwen3-1.7B.jinja", "meta-llama--Llama-3.1-8B-Instruct.jinja",
    "mistralai--Mistral-7B-Instruct-v0.3.jinja", "mistralai--Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "google--gemma-4-E2B-it.jinja", "google--gemma-4-31B-it.jinja", "google--gemma-4-31B-it.rev2.jinja",
    "Qwen--Qwen3.5-4B.jinja", "NousResearch--Hermes-2-Pro-Llama-3-8B.tool_use.jinja",
    "ibm-granite--granite-4.0-h-small.jinja", "openai--gpt-oss-20b.jinja", "zai-org--GLM-4.6.jinja",
    "moonshotai--Kimi-K2-Instruct.jinja", "tiiuae--Falcon3-3B-Instruct.jinja",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_real_template_trains_every_turn_as_inference_sees_it(name):
    tokenizer = real_template_tokenizer(name, *TEMPLATES[name])
    for conversation, messages in CONVERSATIONS.items():
        if "tool_use" in name:
            continue  # a tool-use variant is the template for conversations with tools
        if (name, conversation) in REFUSES:
            with pytest.raises(TemplateError):
                check_conversation(tokenizer, messages)
            continue
        check_conversation(tokenizer, messages)
    trained = False
    for messages in TOOL_CONVERSATIONS:
        # Trained exactly as rendered, or refused with a TemplateError that says why (no tool support, or the
        # template's own error for arguments in the other form): an AssertionError here is a silent mistake.
        try:
            check_conversation(tokenizer, messages, TOOLS)
            trained = True
        except TemplateError:
            pass
    assert trained or name not in TRAINS_TOOL_CALLS


# Families whose tokenizers are SentencePiece models (Metaspace, prepend_scheme "first"): the answer after a prompt is
# tokenised as it continues the prompt, without the "▁" a text of its own would get.
SENTENCEPIECE = [name for name in TEMPLATES if name.startswith(("mistralai--Mistral-7B", "mistralai--Mixtral",
                                                                "microsoft--Phi-3", "meta-llama--Llama-2"))]


@pytest.mark.parametrize("name", sorted(SENTENCEPIECE))
def test_real_template_with_a_sentencepiece_tokenizer_trains_every_turn_as_inference_sees_it(name):
    tokenizer = real_template_tokenizer(name, *TEMPLATES[name], sentencepiece=True)
    assert tokenizer("Hello", add_special_tokens=False).tokens() == ["▁Hello"]  # a text of its own gets its "▁"
    samples = 0
    for messages in CONVERSATIONS.values():
        try:
            samples += check_conversation(tokenizer, messages)
        except TemplateError:  # a template that refuses a conversation (Llama 2: no reasoning fields, say) says so
            pass
    for messages in TOOL_CONVERSATIONS:
        try:
            check_conversation(tokenizer, messages, TOOLS)
        except TemplateError:
            pass
    assert samples >= len(CONVERSATIONS)  # at least one sample per conversation: rendered, not refused


def trained_texts(tokenizer, messages, tools=None) -> list[str]:
    """Each sample's trained spans, decoded in their context, as ``data check`` reads them."""
    return trained_spans(training_samples(messages, tokenizer, tools=tools), tokenizer)


def test_mistral_v03_with_a_system_message_and_tools_trains_the_call_and_the_answer_only():
    # The system message and the tool schemas move into the last user turn: the called function's name first
    # appears inside the schemas, and the turn was once located there (schema and question trained).
    name = "mistralai--Mistral-7B-Instruct-v0.3.jinja"
    tokenizer = real_template_tokenizer(name, *TEMPLATES[name], sentencepiece=True)
    call = {"type": "function", "id": "call12345", "function": {"name": "get_weather", "arguments": '{"city": "Berlin"}'}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How warm is it in Berlin?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "sunny, 21 degrees"},
                {"role": "assistant", "content": "It is sunny, 21 degrees."}]
    assert trained_texts(tokenizer, messages, TOOLS) == [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": "{\\"city\\": \\"Berlin\\"}", "id": "call12345"}]</s>',
        " It is sunny, 21 degrees.</s>",
    ]
    check_conversation(tokenizer, messages, TOOLS)


def test_an_answers_leading_space_survives_the_reasoning_block_a_prompt_opens():
    # QwQ's generation prompt opens <think>: the trained turn is reasoning, the closing tag, and the answer as the
    # template renders it, leading space included (it was stripped).
    name = "Qwen--QwQ-32B.jinja"
    tokenizer = real_template_tokenizer(name, *TEMPLATES[name])
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello there."}]
    assert trained_texts(tokenizer, messages) == ["\n</think>\n\n Hello there.<|im_end|>"]


@pytest.mark.parametrize("name", ["google--gemma-4-E2B-it.jinja", "google--gemma-4-31B-it.jinja",
                                  "google--gemma-4-31B-it.rev2.jinja"])
def test_gemma4_trains_the_whole_tool_call_whether_or_not_its_prompt_opens_a_thought_block(name):
    # The 31B template's generation prompt adds an empty thought block the rendered turn lacks: the call was located
    # by the function's name, and "<|tool_call>call:" before it went untrained (and unseen).
    tokenizer = real_template_tokenizer(name, *TEMPLATES[name])
    assert trained_texts(tokenizer, TOOL_CONVERSATIONS[1], TOOLS) == [
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>', "It is sunny, 21 degrees.<turn|>"]
