import pytest

from sft_lightning.metrics import generation_metrics


def test_generation_metrics_on_known_pairs():
    metrics = generation_metrics(["the cat sat on the mat ", "hello"], ["the cat sat on the mat", "goodbye"])
    assert metrics["count"] == 2 and metrics["exact_match"] == 0.5
    assert metrics["rouge_l"] == pytest.approx(0.5)  # 1.0 for the first pair, 0.0 for the second
    assert 0 < metrics["bleu"] < 1
    assert generation_metrics(["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(1.0)
