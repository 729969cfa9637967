"""Real chat templates of 128 published models (tests/templates/SOURCES.tsv names each one's source), each run on
edge conversations through :func:`training_samples` and checked by :mod:`tests.template_check`: every assistant
turn is trained on exactly what the template renders after its inference prompt, up to its end-of-turn token."""

import pytest

from sft_lightning.errors import TemplateError
from tests.template_check import CONVERSATIONS, TOOL_CONVERSATIONS, TOOLS, check_conversation, real_template_tokenizer, real_templates

TEMPLATES = real_templates()
# Falcon-7B-Instruct's template strips blank lines out of a multi-line answer, so the content is not what it renders.
REFUSES = {("tiiuae--falcon-7b-instruct.jinja", "multiline")}


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
    for messages in TOOL_CONVERSATIONS:
        # Trained exactly as rendered, or refused with a TemplateError that says why (no tool support, or the
        # template's own error for arguments in the other form): an AssertionError here is a silent mistake.
        try:
            check_conversation(tokenizer, messages, TOOLS)
        except TemplateError:
            pass


def test_real_templates_with_tool_support_train_tool_calls():
    trained = set()
    for name, (bos, eos) in TEMPLATES.items():
        tokenizer = real_template_tokenizer(name, bos, eos)
        for messages in TOOL_CONVERSATIONS:
            try:
                check_conversation(tokenizer, messages, TOOLS)
                trained.add(name)
            except TemplateError:
                pass
    assert len(trained) >= 45
    families = {name.split("--")[0] for name in trained}
    assert {"Qwen", "meta-llama", "mistralai", "google", "NousResearch", "ibm-granite", "openai", "zai-org"} <= families
