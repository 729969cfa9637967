"""Generation metrics against reference answers: exact match, BLEU and ROUGE-L (torchmetrics), over a whole set.

Both scores count n-grams of tokens, so the tokenisation decides whether they mean anything: Chinese and Japanese
are written without spaces, and a whitespace tokeniser sees a whole answer as one word (an identical answer scored
0.0 by ROUGE, whose default normaliser also drops every non-ASCII character). sacreBLEU's ``zh`` tokenisation
splits Chinese and Japanese ideographs and punctuation into single characters and leaves other text to ``13a``;
the same tokens feed BLEU and ROUGE-L.
"""

from __future__ import annotations

import re
from typing import Literal

from torchmetrics.text import SacreBLEUScore
from torchmetrics.text.rouge import ROUGEScore

# torchmetrics 1.9 exposes sacreBLEU's tokenisers only through SacreBLEUScore; ROUGE needs the same tokens as a
# callable, so the class behind it is used here, and only here.
from torchmetrics.functional.text.sacre_bleu import _SacreBLEUTokenizer

Tokenize = Literal["auto", "13a", "zh", "char", "intl"]
# Han ideographs, kana and Hangul (CJK scripts), where whitespace does not separate words or a word is one syllable.
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def choose_tokenize(references: list[str], tokenize: Tokenize = "auto") -> str:
    """``auto``: ``zh`` when any reference contains CJK characters, else ``13a`` (sacreBLEU's default)."""
    if tokenize != "auto":
        return tokenize
    return "zh" if any(CJK.search(reference) for reference in references) else "13a"


def generation_metrics(predictions: list[str], references: list[str], tokenize: Tokenize = "auto") -> dict:
    """Corpus-level scores of ``predictions`` against one reference each (whitespace at the ends ignored).

    ``exact_match``: share of predictions equal to their reference; ``bleu``: corpus BLEU-4 (0 for a set of answers shorter than 4 tokens); ``rouge_l``: mean
    ROUGE-L F-measure; ``tokenize``: the sacreBLEU tokenisation both were computed on (see :func:`choose_tokenize`).
    """
    predictions = [p.strip() for p in predictions]
    references = [r.strip() for r in references]
    chosen = choose_tokenize(references, tokenize)
    exact = sum(p == r for p, r in zip(predictions, references)) / len(references)
    bleu = SacreBLEUScore(n_gram=4, tokenize=chosen)(predictions, [[r] for r in references])
    # Lower-cased as ROUGE is; every other character kept (the default normaliser keeps only [a-z0-9]).
    rouge = ROUGEScore(rouge_keys="rougeL", normalizer=str.lower, tokenizer=_SacreBLEUTokenizer(chosen))
    rouge_l = rouge(predictions, references)["rougeL_fmeasure"]
    return {"count": len(references), "exact_match": exact, "bleu": float(bleu), "rouge_l": float(rouge_l),
            "tokenize": chosen}
