"""LaMP's metrics, so scores here can be set beside the numbers the LaMP benchmark reports.

Classification (LaMP-1, 2, 2N): accuracy and macro-F1 over the whole label set. Rating (LaMP-3):
MAE and RMSE, an unparseable answer counting as the worst possible rating. Generation (LaMP-4..7):
ROUGE-1 and ROUGE-L F-measure, averaged per query. Beside them, not one of LaMP's metrics, a
cased ROUGE-1 that keeps capitals and punctuation (see per_example_cased_rouge1).
"""

from __future__ import annotations

import math
import re

import numpy as np

# rouge-score (which loads nltk, 1.4 s) and scikit-learn are imported where they score, so that
# every `persona` command does not pay for them at start-up.


def _check(predictions: list[str], golds: list[str]) -> None:
    """Reject empty or misaligned inputs: a score over nothing, or over mispaired items, is meaningless."""
    if not predictions and not golds:
        raise ValueError("no predictions to score")
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} golds")


def classification_metrics(predictions: list[str], golds: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1; an answer outside `labels` is always wrong, absent labels count as F1 0."""
    from sklearn.metrics import accuracy_score, f1_score

    _check(predictions, golds)
    index = {label.strip(): i for i, label in enumerate(labels)}
    gold_idx = []
    for gold in golds:
        if gold.strip() not in index:
            raise ValueError(f"gold {gold!r} is not one of the labels {labels}")
        gold_idx.append(index[gold.strip()])
    pred_idx = [index.get(pred.strip(), -1) for pred in predictions]
    f1 = f1_score(gold_idx, pred_idx, labels=list(range(len(labels))), average="macro", zero_division=0.0)
    return {"accuracy": float(accuracy_score(gold_idx, pred_idx)), "f1": float(f1)}


def rating_metrics(predictions: list[str], golds: list[str], labels: list[str]) -> dict[str, float]:
    """MAE and RMSE; an unparseable answer takes the rating farthest from its gold, so it is never rewarded."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    _check(predictions, golds)
    lo, hi = min(float(label) for label in labels), max(float(label) for label in labels)
    gold_vals, pred_vals = [], []
    for pred, gold in zip(predictions, golds):
        try:
            g = float(gold.strip())
        except ValueError:
            raise ValueError(f"gold {gold!r} is not a number") from None
        try:
            p = float(pred.strip())
        except ValueError:
            p = lo if abs(lo - g) > abs(hi - g) else hi
        gold_vals.append(g)
        pred_vals.append(p)
    return {
        "mae": float(mean_absolute_error(gold_vals, pred_vals)),
        "rmse": float(math.sqrt(mean_squared_error(gold_vals, pred_vals))),
    }


def per_example_rouge(predictions: list[str], golds: list[str]) -> list[dict[str, float]]:
    """ROUGE-1 and ROUGE-L F-measure of each query (no stemming), kept per query for paired comparisons."""
    from rouge_score import rouge_scorer

    _check(predictions, golds)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    out = []
    for pred, gold in zip(predictions, golds):
        scores = scorer.score(target=gold, prediction=pred)
        out.append({"rouge-1": float(scores["rouge1"].fmeasure), "rouge-L": float(scores["rougeL"].fmeasure)})
    return out


CASED_ROUGE_1 = "rouge-1-cased"
_CASED_TOKEN = re.compile(r"\w+|[^\w\s]")


class _CasedTokenizer:
    """Words and numbers as they are written, and every punctuation mark or emoticon character as a
    token of its own (rouge-score takes any object with a tokenize method)."""

    def tokenize(self, text: str) -> list[str]:
        return _CASED_TOKEN.findall(text)


def per_example_cased_rouge1(predictions: list[str], golds: list[str]) -> list[float]:
    """ROUGE-1 F-measure of each query with case and punctuation kept. LaMP's ROUGE lowercases and
    drops everything but letters and digits, so much of what makes a tweet its writer's (capitals
    or none, "!!", "...", ":)") counts for nothing there; this counts it. A supplementary measure,
    not LaMP's: reported beside ROUGE, never instead of it."""
    from rouge_score import rouge_scorer

    _check(predictions, golds)
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False, tokenizer=_CasedTokenizer())
    return [float(scorer.score(target=gold, prediction=pred)["rouge1"].fmeasure) for pred, gold in zip(predictions, golds)]


def per_example_generation_scores(predictions: list[str], golds: list[str]) -> dict[str, list[float]]:
    """Per query, by measure: LaMP's ROUGE-1 and ROUGE-L, then the supplementary cased ROUGE-1.
    The one list of what a generation answer is scored on (runs report the means, benchmarks pair the
    per-query values)."""
    rows = per_example_rouge(predictions, golds)
    return {
        "rouge-1": [row["rouge-1"] for row in rows],
        "rouge-L": [row["rouge-L"] for row in rows],
        CASED_ROUGE_1: per_example_cased_rouge1(predictions, golds),
    }


def generation_metrics(predictions: list[str], golds: list[str]) -> dict[str, float]:
    """Mean over queries of per-query ROUGE F-measure (LaMP's plain average, not a corpus-level score)."""
    rows = per_example_rouge(predictions, golds)
    return {key: float(sum(row[key] for row in rows) / len(rows)) for key in ("rouge-1", "rouge-L")}


def bootstrap_interval(values: list[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query scores (or of paired per-query
    differences): how far a benchmark's mean could move with another sample of the same users."""
    from scipy.stats import bootstrap

    if len(values) < 2:
        return (float(values[0]), float(values[0])) if values else (math.nan, math.nan)
    if min(values) == max(values):
        return float(values[0]), float(values[0])
    result = bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile", random_state=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
