"""Real chat templates of 128 published models (tests/templates/SOURCES.tsv names each one's source), each run on
edge conversations through :func:`training_samples` and checked by :mod:`tests.template_check`: every assistant
turn is trained on exactly what the template renders after its inference prompt, up to its end-of-turn token."""

import pytest

from sft_lightning.errors import TemplateError
from tests.template_check import CONVERSATIONS, TOOL_CONVERSATIONS, TOOLS, check_conversation, real_template_tokenizer, real_templates

TEMPLATES = real_templates()
# Falcon-7B-Instruct's template strips blank lines out of a multi-line answer, so the content is not what it renders.
REFUSES = {("tiiuae--falcon-7b-instruct.jinja", "multiline")}
# One template per family whose template renders tools: its tool call must be trained (48 of the 132 are).
TRAINS_TOOL_CALLS = {
    "Qwen--Qwen2.5-3B-Instruct.jinja", "Qwen--Qwen3-1.7B.jinja", "meta-llama--Llama-3.1-8B-Instruct.jinja",
    "mistralai--Mistral-7B-Instruct-v0.3.jinja", "mistralai--Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "google--gemma-4-E2B-it.jinja", "NousResearch--Hermes-2-Pro-Llama-3-8B.tool_use.jinja",
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
