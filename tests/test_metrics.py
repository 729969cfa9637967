import pytest

from sft_lightning.metrics import generation_metrics


def test_generation_metrics_on_known_pairs():
    metrics = generation_metrics(["the cat sat on the mat ", "hello"], ["the cat sat on the mat", "goodbye"])
    assert metrics["count"] == 2 and metrics["exact_match"] == 0.5 and metrics["tokenize"] == "13a"
    assert metrics["rouge_l"] == pytest.approx(0.5)  # 1.0 for the first pair, 0.0 for the second
    assert 0 < metrics["bleu"] < 1
    assert generation_metrics(["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(1.0)


def test_chinese_and_japanese_are_scored_by_character():
    reference = "北京今天晴，气温二十一度。"
    same = generation_metrics([reference], [reference])
    assert same["tokenize"] == "zh" and same["bleu"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)
    half = generation_metrics(["北京今天晴。"], [reference])  # 6 of the 13 characters, all in order
    assert half["rouge_l"] == pytest.approx(2 * 6 / (6 + 13)) and 0 < half["bleu"] < 1
    assert generation_metrics(["東京は日本の首都です。"], ["東京は日本の首都です。"])["rouge_l"] == pytest.approx(1.0)

    # Forced whitespace tokenisation: the whole answer is one word, so a near miss scores nothing.
    assert generation_metrics(["北京今天晴。"], [reference], tokenize="13a")["rouge_l"] == 0.0
