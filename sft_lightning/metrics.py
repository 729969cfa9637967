"""Generation metrics against reference answers: exact match, BLEU and ROUGE-L (torchmetrics), over a whole set."""

from __future__ import annotations

from torchmetrics.text import BLEUScore
from torchmetrics.text.rouge import ROUGEScore


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level scores of ``predictions`` against one reference each (whitespace at the ends ignored).

    ``exact_match``: share of predictions equal to their reference; ``bleu``: corpus BLEU-4; ``rouge_l``: mean
    ROUGE-L F-measure.
    """
    predictions = [p.strip() for p in predictions]
    references = [r.strip() for r in references]
    exact = sum(p == r for p, r in zip(predictions, references)) / len(references)
    bleu = BLEUScore(n_gram=4)(predictions, [[r] for r in references])
    rouge = ROUGEScore(rouge_keys="rougeL")(predictions, references)["rougeL_fmeasure"]
    return {"count": len(references), "exact_match": exact, "bleu": float(bleu), "rouge_l": float(rouge)}
