import pytest
import torch

from sft_lightning.collate import collate_training
from sft_lightning.errors import TemplateError
from sft_lightning.render import (
    CHATML_TEMPLATE,
    end_of_turn_token_id,
    load_tokenizer,
    render_conversation,
    render_prompt,
)
from tests.conftest import CHATML_TEMPLATE as TEST_CHATML
from tests.conftest import TINY_LLAMA, TINY_QWEN, names, word_tokenizer

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


def render(tokenizer, messages, **kwargs):
    sample = render_conversation(messages, tokenizer, **kwargs)
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
    long = render_conversation(MULTI, tokenizer)
    short = render_conversation(SINGLE, tokenizer)
    batch = collate_training([long.input_ids, short.input_ids], [long.labels, short.labels], tokenizer.pad_token_id)
    eot = tokenizer.convert_tokens_to_ids(E)
    assert names(tokenizer, batch["labels"][1].tolist()) == [None] * 9 + ["hello", E] + [None] * 23
    assert batch["input_ids"][1, 12:].eq(eot).all()  # padded with the eos id ...
    assert batch["attention_mask"][1].tolist() == [1] * 12 + [0] * 22  # ... but masked by position
    assert (batch["labels"] == eot).sum() == 3  # every real end-of-turn is still a label


def test_template_without_generation_prompt_is_refused():
    ignores_prompt = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
    tokenizer = word_tokenizer(["<pad>", "<|im_start|>", "<|im_end|>"], ignores_prompt, pad_token="<pad>")
    with pytest.raises(TemplateError, match="add_generation_prompt"):
        render_conversation(SINGLE, tokenizer)


def test_template_without_special_end_of_turn_is_refused():
    plain = (
        "{% for m in messages %}{{ m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant\\n' }}{% endif %}"
    )
    tokenizer = word_tokenizer(["<pad>"], plain, pad_token="<pad>")
    with pytest.raises(TemplateError, match="end-of-turn"):
        render_conversation(SINGLE, tokenizer)


def test_template_that_injects_text_into_the_answer_is_refused():
    injects = TEST_CHATML.replace("m['content'] + '<|im_end|>", "m['content'] + ' bye<|im_end|>")
    tokenizer = word_tokenizer(["<pad>", "<|im_start|>", "<|im_end|>"], injects, pad_token="<pad>")
    with pytest.raises(TemplateError, match="renders more than the content"):
        render_conversation(SINGLE, tokenizer)


def test_tokenizer_without_template_falls_back_to_chatml(tmp_path):
    word_tokenizer(["<unk>", "</s>"], None, eos_token="</s>").save_pretrained(tmp_path)
    load_tokenizer.cache_clear()
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.chat_template == CHATML_TEMPLATE
    _, labels, _ = render(tokenizer, SINGLE)
    assert labels == [None] * 9 + ["hello", E, None]
    assert tokenizer.pad_token is not None


@pytest.mark.parametrize("path, stop", [(TINY_QWEN, "<|im_end|>"), (TINY_LLAMA, "<|eot_id|>")])
def test_shipped_tokenizers_match_apply_chat_template(path, stop):
    tokenizer = load_tokenizer(path)
    messages = [{"role": "system", "content": "Be brief!"}] + MULTI[1:]
    sample = render_conversation(messages, tokenizer)
    assert sample.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    supervised = tokenizer.decode([t for t in sample.labels if t != -100])
    assert supervised == f"hello{stop}fine thanks{stop}"
    assert tokenizer.convert_ids_to_tokens(end_of_turn_token_id(tokenizer)) == stop
    prompt = render_prompt(messages[:4], tokenizer)
    assert prompt == tokenizer.apply_chat_template(messages[:4], add_generation_prompt=True)["input_ids"]
    assert sample.input_ids[: len(prompt)] == prompt  # training and inference see the same prefix
