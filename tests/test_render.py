import json

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sft_lightning.collate import collate_training
from sft_lightning.errors import TemplateError
from sft_lightning.records import read_records
from sft_lightning.tokenized import tokenize_split
from sft_lightning.render import (
    CHATML_TEMPLATE,
    end_of_turn_token_id,
    has_system_role,
    load_tokenizer,
    render_prompt,
    training_samples,
)
from tests.conftest import CHATML_TEMPLATE as TEST_CHATML
from tests.conftest import ROOT, TINY_LLAMA, TINY_QWEN, WORDS, names, word_tokenizer

SINGLE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
MULTI = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thanks"},
]
S, E, N = "<|im_start|>", "<|im_end|>", "\n"
H0, H1, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


def one_sample(messages, tokenizer, **kwargs):
    samples = training_samples(messages, tokenizer, **kwargs)
    assert len(samples) == 1
    return samples[0]


def render(tokenizer, messages, **kwargs):
    sample = one_sample(messages, tokenizer, **kwargs)
    assert sample.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"][: len(sample.input_ids)]
    return names(tokenizer, sample.input_ids), names(tokenizer, sample.labels), sample


def test_chatml_single_turn_trains_content_and_end_of_turn_only(chatml_tokenizer):
    tokens, labels, _ = render(chatml_tokenizer, SINGLE)
    assert tokens == [S, "user", N, "hi", E, N, S, "assistant", N, "hello", E, N]
    assert labels == [None] * 9 + ["hello", E, None]


def test_chatml_multi_turn_with_system(chatml_tokenizer):
    tokens, labels, sample = render(chatml_tokenizer, MULTI)
    assert tokens == [
        S, "system", N, "be", "brief", E, N,
        S, "user", N, "hi", E, N,
        S, "assistant", N, "hello", E, N,
        S, "user", N, "how", "are", "you", E, N,
        S, "assistant", N, "fine", "thanks", E, N,
    ]
    assert labels == [None] * 16 + ["hello", E] + [None] * 12 + ["fine", "thanks", E, None]
    assert sample.supervised_tokens == 5


def test_chatml_train_on_last_and_all(chatml_tokenizer):
    _, last, _ = render(chatml_tokenizer, MULTI, train_on="last")
    assert last == [None] * 30 + ["fine", "thanks", E, None]
    tokens, everything, _ = render(chatml_tokenizer, MULTI, train_on="all")
    assert everything == [None] + tokens[1:]  # the first token has nothing to be predicted from


def test_llama3_header_template(llama3_tokenizer):
    tokens, labels, _ = render(llama3_tokenizer, MULTI)
    bos = "<|begin_of_text|>"
    assert tokens == [
        bos, H0, "system", H1, N, N, "be", "brief", EOT,
        H0, "user", H1, N, N, "hi", EOT,
        H0, "assistant", H1, N, N, "hello", EOT,
        H0, "user", H1, N, N, "how", "are", "you", EOT,
        H0, "assistant", H1, N, N, "fine", "thanks", EOT,
    ]
    assert labels == [None] * 21 + ["hello", EOT] + [None] * 14 + ["fine", "thanks", EOT]
    tokens, labels, _ = render(llama3_tokenizer, SINGLE, train_on="last")
    assert labels == [None] * 13 + ["hello", EOT]


def test_truncation_keeps_the_head_and_its_labels(chatml_tokenizer):
    tokens, labels, sample = render(chatml_tokenizer, MULTI, max_length=18)
    assert sample.truncated and len(tokens) == 18
    assert labels == [None] * 16 + ["hello", E]
    _, _, short = render(chatml_tokenizer, MULTI, max_length=12)
    assert short.supervised_tokens == 0  # the data module drops and counts such samples


def test_pad_equal_to_eos_keeps_the_real_end_of_turn_trained():
    tokenizer = word_tokenizer(["<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE, pad_token="<|im_end|>", eos_token="<|im_end|>")
    long = one_sample(MULTI, tokenizer)
    short = one_sample(SINGLE, tokenizer)
    batch = collate_training([long.input_ids, short.input_ids], [long.labels, short.labels], tokenizer.pad_token_id)
    eot = tokenizer.convert_tokens_to_ids(E)
    assert names(tokenizer, batch.labels[1].tolist()) == [None] * 9 + ["hello", E] + [None] * 23
    assert batch.input_ids[1, 12:].eq(eot).all()  # padded with the eos id ...
    assert batch.attention_mask[1].tolist() == [1] * 12 + [0] * 22  # ... but masked by position
    assert (batch.labels == eot).sum() == 3  # every real end-of-turn is still a label


def test_template_without_generation_prompt_is_refused():
    ignores_prompt = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
    tokenizer = word_tokenizer(["<pad>", "<|im_start|>", "<|im_end|>"], ignores_prompt, pad_token="<pad>")
    with pytest.raises(TemplateError, match="add_generation_prompt"):
        one_sample(SINGLE, tokenizer)


def test_template_without_special_end_of_turn_is_refused():
    plain = (
        "{% for m in messages %}{{ m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant\\n' }}{% endif %}"
    )
    tokenizer = word_tokenizer(["<pad>"], plain, pad_token="<pad>")
    with pytest.raises(TemplateError, match="end-of-turn"):
        one_sample(SINGLE, tokenizer)


def test_template_that_injects_text_into_the_answer_is_refused():
    injects = TEST_CHATML.replace("m['content'] + '<|im_end|>", "m['content'] + ' bye<|im_end|>")
    tokenizer = word_tokenizer(["<pad>", "<|im_start|>", "<|im_end|>"], injects, pad_token="<pad>")
    with pytest.raises(TemplateError, match="renders more than the content"):
        one_sample(SINGLE, tokenizer)


def test_tokenizer_without_template_falls_back_to_chatml(tmp_path):
    word_tokenizer(["<unk>", "</s>"], None, eos_token="</s>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.chat_template == CHATML_TEMPLATE
    _, labels, _ = render(tokenizer, SINGLE)
    assert labels == [None] * 9 + ["hello", E, None]
    assert tokenizer.pad_token is not None


@pytest.mark.parametrize("path, stop", [(TINY_QWEN, "<|im_end|>"), (TINY_LLAMA, "<|eot_id|>")])
def test_shipped_tokenizers_match_apply_chat_template(path, stop):
    tokenizer = load_tokenizer(path)
    messages = [{"role": "system", "content": "Be brief!"}] + MULTI[1:]
    sample = one_sample(messages, tokenizer)
    assert sample.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    supervised = tokenizer.decode([t for t in sample.labels if t != -100])
    assert supervised == f"hello{stop}fine thanks{stop}"
    assert tokenizer.convert_ids_to_tokens(end_of_turn_token_id(tokenizer)) == stop
    prompt = render_prompt(messages[:4], tokenizer)
    assert prompt == tokenizer.apply_chat_template(messages[:4], add_generation_prompt=True)["input_ids"]
    assert sample.input_ids[: len(prompt)] == prompt  # training and inference see the same prefix


# A Qwen3-like template: the assistant turns after the last user message carry a <think> block (reasoning_content,
# or empty); earlier assistant turns are rendered without it, so the history is rewritten from turn to turn.
QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_user -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + (m.get('reasoning_content') or '') + '\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
T0, T1 = "<think>", "</think>"


def test_history_rewriting_template_trains_each_turn_as_inference_sees_it():
    tokenizer = word_tokenizer(["<pad>", S, E], QWEN3_LIKE, words=(T0, T1), pad_token="<pad>", eos_token=E)
    messages = MULTI[:-1] + [{**MULTI[-1], "reasoning_content": "be brief"}]
    first, second = training_samples(messages, tokenizer)
    assert first.differs == second.differs == "history"
    history = [S, "system", N, "be", "brief", E, N, S, "user", N, "hi", E, N]
    assert names(tokenizer, first.input_ids) == history + [S, "assistant", N, T0, N, N, T1, N, N, "hello", E]
    assert names(tokenizer, first.labels) == [None] * 16 + [T0, N, N, T1, N, N, "hello", E]
    # In the second turn's prompt the first answer has lost its <think> block, as at inference.
    prompt = history + [S, "assistant", N, "hello", E, N, S, "user", N, "how", "are", "you", E, N, S, "assistant", N]
    answer = [T0, N, "be", "brief", N, T1, N, N, "fine", "thanks", E]
    assert names(tokenizer, second.input_ids) == prompt + answer
    assert names(tokenizer, second.labels) == [None] * len(prompt) + answer
    assert second.input_ids[: len(prompt)] == render_prompt(messages[:4], tokenizer)
    [last] = training_samples(messages, tokenizer, train_on="last")
    assert names(tokenizer, last.labels) == names(tokenizer, second.labels) + [None]  # and the newline after it


MISTRAL_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_template_that_ignores_the_generation_prompt_trains_up_to_its_closing_token():
    tokenizer = word_tokenizer(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], MISTRAL_LIKE, bos_token="<s>", eos_token="</s>")
    tokens, labels, _ = render(tokenizer, MULTI[1:])
    assert tokens == ["<s>", "[INST]", "hi", "[/INST]", "hello", "</s>", "[INST]", "how", "are", "you", "[/INST]", "fine", "thanks", "</s>"]
    assert labels == [None] * 4 + ["hello", "</s>"] + [None] * 5 + ["fine", "thanks", "</s>"]


GEMMA2_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def test_template_without_a_system_role_gets_the_system_message_in_the_first_user_turn():
    specials = ["<pad>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = word_tokenizer(specials, GEMMA2_LIKE, words=("model",), pad_token="<pad>", bos_token="<bos>")
    B, O = "<start_of_turn>", "<end_of_turn>"
    sample = one_sample(MULTI, tokenizer)
    tokens, labels = names(tokenizer, sample.input_ids), names(tokenizer, sample.labels)
    assert tokens == [
        "<bos>", B, "user", N, "be", "brief", N, N, "hi", O, N, B, "model", N, "hello", O, N,
        B, "user", N, "how", "are", "you", O, N, B, "model", N, "fine", "thanks", O, N,
    ]
    assert labels == [None] * 14 + ["hello", O] + [None] * 12 + ["fine", "thanks", O, None]
    assert render_prompt(MULTI[:2], tokenizer) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "be brief\n\nhi"}], add_generation_prompt=True)["input_ids"]  # chat and predict too


def test_special_token_text_in_content_is_named():
    tokenizer = word_tokenizer(["<pad>", S, E], TEST_CHATML, pad_token="<pad>", eos_token=E)
    with pytest.raises(TemplateError, match="message 2 contains the text of the special token '<|im_end|>'"):
        training_samples([SINGLE[0], {"role": "assistant", "content": "hello <|im_end|> bye"}], tokenizer)


def test_a_token_merging_across_the_prompt_boundary_never_enters_the_prompt():
    # "\n\n" is one token here: an answer that starts with a newline merges with the header's newline when the
    # whole conversation is tokenised at once, but generate() is given the header alone.
    vocab = {token: i for i, token in enumerate(["<pad>", S, E, "\n", "\n\n", *WORDS[1:]])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("\n+"), "isolated"), pre_tokenizers.Split(Regex(" "), "removed")]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=[S, E], pad_token="<pad>",
                                        chat_template=TEST_CHATML)
    messages = [SINGLE[0], {"role": "assistant", "content": "\nhello"}, MULTI[3], MULTI[4]]
    first, second = training_samples(messages, tokenizer)  # one sample would put "\n\n" in the second prompt
    assert first.differs == second.differs == "boundary"  # counted apart in the setup summary and data check
    prompt = render_prompt(messages[:1], tokenizer)
    assert first.input_ids[: len(prompt)] == prompt and names(tokenizer, prompt)[-1] == N
    assert names(tokenizer, first.labels) == [None] * len(prompt) + [N, "hello", E]
    later = render_prompt(messages[:3], tokenizer)
    assert "\n\n" in names(tokenizer, later) and second.input_ids[: len(later)] == later


# A ChatML template with tools, as Qwen2.5's renders them (simplified so that the words tokenise one by one).
TOOLS_CHATML = (
    "{%- if tools -%}{{ '<|im_start|>system\\ntools' }}{%- for t in tools -%}{{ ' ' + t['function']['name'] }}{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') -%}"
    "{{ '<|im_start|>assistant\\n' + m['content'] }}{%- for c in m['tool_calls'] -%}{{ '<tool_call> ' + c['function']['name'] + ' </tool_call>' }}{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
TOOL_CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "bye", "arguments": {}}}]},
    {"role": "tool", "content": "fine"},
    {"role": "assistant", "content": "thanks"},
]
TOOLS = [{"type": "function", "function": {"name": "bye", "parameters": {}}}]


def test_tool_calls_are_trained_as_rendered_and_tool_results_never():
    tokenizer = word_tokenizer(["<pad>", S, E], TOOLS_CHATML, words=("tools", "tool", "<tool_call>", "</tool_call>"),
                               pad_token="<pad>", eos_token=E)
    [sample] = training_samples(TOOL_CONVERSATION, tokenizer, tools=TOOLS)
    tokens, labels = names(tokenizer, sample.input_ids), names(tokenizer, sample.labels)
    assert tokens == [
        S, "system", N, "tools", "bye", E, N, S, "user", N, "hi", E, N,
        S, "assistant", N, "<tool_call>", "bye", "</tool_call>", E, N,
        S, "tool", N, "fine", E, N, S, "assistant", N, "thanks", E, N,
    ]
    assert labels == [None] * 16 + ["<tool_call>", "bye", "</tool_call>", E] + [None] * 10 + ["thanks", E, None]
    prompt = render_prompt(TOOL_CONVERSATION[:3], tokenizer, TOOLS)  # after the tool result
    assert sample.input_ids[: len(prompt)] == prompt and names(tokenizer, prompt)[-3:] == [S, "assistant", N]


def test_a_template_without_tool_support_is_named(chatml_tokenizer):
    with pytest.raises(TemplateError, match="ignores 'tools'"):
        training_samples(TOOL_CONVERSATION, chatml_tokenizer, tools=TOOLS)
    with pytest.raises(TemplateError, match="does not render the tool_calls of message 2"):
        training_samples(TOOL_CONVERSATION, chatml_tokenizer)


def test_system_message_choice_under_a_template_without_a_system_role():
    specials = ["<pad>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = word_tokenizer(specials, GEMMA2_LIKE, words=("model",), pad_token="<pad>", bos_token="<bos>")
    assert not has_system_role(tokenizer) and has_system_role(word_tokenizer(["<pad>", S, E], TEST_CHATML, pad_token="<pad>"))
    with pytest.raises(TemplateError, match="no system role; data.system_message auto merges it"):
        training_samples(MULTI, tokenizer, system_message="error")
    assert training_samples(MULTI[1:], tokenizer, system_message="error") == training_samples(MULTI[1:], tokenizer)


# A DeepSeek-R1-like template: the generation prompt opens <think>, earlier answers lose their reasoning.
R1_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|User|>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{ '<|Assistant|>' + c + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|Assistant|><think>\\n' }}{% endif %}"
)


def test_generation_prompt_that_opens_a_reasoning_block_trains_the_continuation():
    specials = ["<pad>", "<bos>", "<|User|>", "<|Assistant|>", "<|end|>"]
    tokenizer = word_tokenizer(specials, R1_LIKE, words=(T0, T1), pad_token="<pad>", bos_token="<bos>")
    messages = [MULTI[1], {"role": "assistant", "content": "<think>\nbe brief\n</think>\n\nhello"},
                MULTI[3], {"role": "assistant", "content": "<think>\nfine\n</think>\n\nfine thanks"}]
    first, second = training_samples(messages, tokenizer)
    prompt = ["<bos>", "<|User|>", "hi", "<|Assistant|>", T0, N]
    assert names(tokenizer, first.input_ids[:6]) == prompt and first.input_ids[:6] == render_prompt(messages[:1], tokenizer)
    assert names(tokenizer, first.labels) == [None] * 6 + ["be", "brief", N, T1, N, N, "hello", "<|end|>"]
    # The second prompt holds the first answer without its reasoning, as at inference.
    later = render_prompt(messages[:3], tokenizer)
    assert names(tokenizer, later) == ["<bos>", "<|User|>", "hi", "<|Assistant|>", N, N, "hello", "<|end|>",
                                       "<|User|>", "how", "are", "you", "<|Assistant|>", T0, N]
    assert second.input_ids[: len(later)] == later
    assert names(tokenizer, second.labels)[len(later):] == ["fine", N, T1, N, N, "fine", "thanks", "<|end|>"]
    # A plain answer continues the opened block as an empty one (Qwen3's layout for a turn without reasoning);
    # a reasoning_content field fills it.
    [plain] = training_samples(MULTI[1:3], tokenizer)
    assert names(tokenizer, plain.labels) == [None] * 6 + [N, T1, N, N, "hello", "<|end|>"]
    [field] = training_samples([MULTI[1], {**MULTI[2], "reasoning_content": "be brief"}], tokenizer)
    assert names(tokenizer, field.labels) == [None] * 6 + ["be", "brief", N, T1, N, N, "hello", "<|end|>"]


def test_a_generation_prompt_ending_in_extra_whitespace_is_followed_by_the_answer():
    # Phi-3-style templates kept with their line breaks: the prompt ends with a newline the rendered turn lacks.
    tokenizer = word_tokenizer(["<pad>", S, E], TEST_CHATML.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n\\n'"),
                               pad_token="<pad>", eos_token=E)
    [sample] = training_samples(SINGLE, tokenizer)
    prompt = render_prompt(SINGLE[:1], tokenizer)
    assert names(tokenizer, prompt)[-3:] == ["assistant", N, N] and sample.input_ids[: len(prompt)] == prompt
    assert names(tokenizer, sample.labels) == [None] * len(prompt) + ["hello", E]


def test_the_setup_summary_counts_merged_system_messages(tmp_path):
    specials = ["<pad>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = word_tokenizer(specials, GEMMA2_LIKE, words=("model",), pad_token="<pad>", bos_token="<bos>")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (MULTI, MULTI[1:], MULTI)) + "\n")
    split = tokenize_split(str(path), tokenizer, 64, "assistant")
    assert split.merged_system == 2 and "(2 system messages merged into the first user turn" in split.summary("train")
    skipped = tokenize_split(str(path), tokenizer, 64, "assistant", on_invalid="skip", system_message="error")
    assert skipped.merged_system == 0 and len(skipped) == 1  # refused, not merged


GLM4_LIKE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def test_a_turn_closed_only_by_the_next_turns_opening_token_trains_that_token():
    # GLM-4 renders nothing after an answer: the next <|user|> ends it (and is among the model's stop tokens).
    specials = ["<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = word_tokenizer(specials, GLM4_LIKE, pad_token="<pad>")
    [sample] = training_samples(MULTI[1:], tokenizer)
    U, A = "<|user|>", "<|assistant|>"
    assert names(tokenizer, sample.input_ids) == [U, N, "hi", A, N, "hello", U, N, "how", "are", "you", A, N, "fine", "thanks", U]
    assert names(tokenizer, sample.labels) == [None] * 4 + [N, "hello", U] + [None] * 5 + [N, "fine", "thanks", U]
    assert tokenizer.convert_ids_to_tokens(end_of_turn_token_id(tokenizer)) == U


def test_a_template_without_any_closing_token_gets_eos_after_each_answer():
    plain = (
        "{% for m in messages %}{{ m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant\\n' }}{% endif %}"
    )
    tokenizer = word_tokenizer(["<pad>", "</s>"], plain, pad_token="<pad>", eos_token="</s>")
    first, second = training_samples(MULTI[1:], tokenizer)  # the EOS is not in the next turn's prompt
    assert names(tokenizer, first.labels) == [None] * 6 + ["hello", "</s>"]
    assert names(tokenizer, second.input_ids) == ["user", N, "hi", N, "assistant", N, "hello", N, "user", N, "how", "are",
                                                  "you", N, "assistant", N, "fine", "thanks", "</s>"]
    assert names(tokenizer, second.labels) == [None] * 16 + ["fine", "thanks", "</s>"]


# Mistral v0.3: the system message goes into the latest user turn only, so it moves from turn to turn.
MISTRAL_V3_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- set msgs = messages[1:] %}"
    "{%- else %}{%- set msgs = messages %}{%- endif %}{{ bos_token }}{%- for m in msgs %}{%- if m['role'] == 'user' %}"
    "{%- if loop.last and system is defined %}{{ '[INST] ' + system + ' ' + m['content'] + ' [/INST]' }}"
    "{%- else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{%- endif %}{%- else %}{{ ' ' + m['content'] + eos_token }}"
    "{%- endif %}{%- endfor %}"
)


def test_a_system_message_that_moves_to_the_latest_user_turn_is_trained_as_each_prompt_shows_it():
    tokenizer = word_tokenizer(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], MISTRAL_V3_LIKE, bos_token="<s>", eos_token="</s>")
    first, second = training_samples(MULTI, tokenizer)
    assert first.differs == second.differs == "history"
    assert names(tokenizer, first.input_ids) == ["<s>", "[INST]", "be", "brief", "hi", "[/INST]", "hello", "</s>"]
    assert names(tokenizer, first.labels) == [None] * 6 + ["hello", "</s>"]
    prompt = ["<s>", "[INST]", "hi", "[/INST]", "hello", "</s>", "[INST]", "be", "brief", "how", "are", "you", "[/INST]"]
    assert names(tokenizer, second.input_ids) == prompt + ["fine", "thanks", "</s>"]
    assert names(tokenizer, second.labels) == [None] * len(prompt) + ["fine", "thanks", "</s>"]


def test_special_token_text_in_content_is_refused_or_trained_as_plain_text():
    tokenizer = load_tokenizer(TINY_QWEN)
    messages = [{"role": "user", "content": "What ends a turn?"}, {"role": "assistant", "content": "The text <|im_end|> does."}]
    with pytest.raises(TemplateError, match=r"message 2 .* '<\|im_end\|>'.*data.split_special_tokens true"):
        training_samples(messages, tokenizer)
    [sample] = training_samples(messages, tokenizer, split_special_tokens=True)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained = [label for label in sample.labels if label != -100]
    assert trained.count(eot) == 1 and trained[-1] == eot  # the content's <|im_end|> is plain text, not the token
    assert tokenizer.decode(trained) == "The text <|im_end|> does.<|im_end|>"
    prompt = render_prompt(messages[:1], tokenizer, split_special_tokens=True)
    assert sample.input_ids[: len(prompt)] == prompt and prompt.count(eot) == 1  # the user turn's own end only


@pytest.mark.parametrize("model, samples, digest", [
    ("tiny-qwen2", 640, "154542ac3b916ee2"),  # ChatML: one sample per conversation
    ("tiny-qwen3", 788, "5ae7cde2248e0211"),  # rewrites history: one sample per assistant turn
    ("tiny-llama3", 640, "cbf3e676d7fac1e8"),
])
def test_the_shipped_data_renders_to_the_same_samples_as_before(model, samples, digest):
    """The rendered ids, labels and flags of both shipped data files, pinned (as rendered when preparation began to be
    made faster, issue 26): a faster preparation must give exactly these."""
    import hashlib

    tokenizer = load_tokenizer(str(ROOT / "models" / model))
    found, count = hashlib.sha256(), 0
    for name in ("chatml_data.json", "chatml_zh.json"):
        for record in read_records(ROOT / "data" / name):
            for sample in training_samples(record.messages, tokenizer, "assistant", 256):
                found.update(json.dumps([sample.input_ids, sample.labels, sample.truncated, sample.differs]).encode())
                count += 1
    assert (count, found.hexdigest()[:16]) == (samples, digest)
