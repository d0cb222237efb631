"""LaMP metrics against values worked out by hand (the arithmetic is in each test's comments)."""

from __future__ import annotations

import math

import pytest

from recipes.kit.metrics import classification_metrics, generation_metrics, per_example_cased_rouge1, per_example_rouge, rating_metrics

LABELS = ["a", "b", "c"]
RATINGS = ["1", "2", "3", "4", "5"]


def test_classification_macro_f1_counts_absent_label_and_outside_prediction():
    # golds a a b b, preds a b b zzz ("zzz" is outside the labels -> index -1, always wrong).
    # accuracy: correct at positions 0 and 2 -> 2/4 = 0.5
    # a: TP=1, predicted a 1 time -> P=1/1, gold a 2 times -> R=1/2, F1=2*1*0.5/1.5 = 2/3
    # b: TP=1, predicted b 2 times -> P=1/2, gold b 2 times -> R=1/2, F1=1/2
    # c: never gold, never predicted -> F1=0 (still counted in the macro mean)
    # macro-F1 = (2/3 + 1/2 + 0) / 3 = 7/18  (without c it would be 7/12)
    result = classification_metrics(["a", "b", "b", "zzz"], ["a", "a", "b", "b"], LABELS)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(7 / 18)
    assert all(type(v) is float for v in result.values())


def test_classification_macro_f1_is_over_the_whole_label_set():
    # golds a a b b, preds a b b b; label c never occurs and no prediction is outside the labels
    # a: TP=1, predicted 1, gold 2 -> P=1, R=1/2, F1=2/3
    # b: TP=2, predicted 3, gold 2 -> P=2/3, R=1, F1=2*(2/3)*1/(5/3) = 4/5
    # c: F1=0 -> macro-F1 = (2/3 + 4/5 + 0) / 3 = 22/45 (averaging only a, b would give 11/15)
    result = classification_metrics(["a", "b", "b", "b"], ["a", "a", "b", "b"], LABELS)
    assert result["accuracy"] == pytest.approx(3 / 4)
    assert result["f1"] == pytest.approx(22 / 45)


def test_classification_strips_only_whitespace():
    # " a\n" strips to "a" (right); "A" is not "a" (wrong) -> accuracy 1/2
    # a: TP=1, predicted 1, gold 2 -> P=1, R=1/2, F1=2/3; b, c: 0 -> macro = (2/3)/3 = 2/9
    result = classification_metrics([" a\n", "A"], ["a", "a "], LABELS)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(2 / 9)


def test_classification_perfect():
    # every label predicted right once: P=R=F1=1 for a, b, c -> accuracy 1, macro-F1 1
    result = classification_metrics(["a", "b", "c"], ["a", "b", "c"], LABELS)
    assert result == {"accuracy": pytest.approx(1.0), "f1": pytest.approx(1.0)}


def test_classification_gold_outside_labels_raises():
    with pytest.raises(ValueError, match="'d'"):
        classification_metrics(["a"], ["d"], LABELS)


def test_rating_unparseable_answers_take_the_farthest_rating():
    # gold 1, "n/a": |1-1|=0 > |5-1|=4? no -> 5, error 4
    # gold 4, "four": |1-4|=3 > |5-4|=1 -> 1, error 3
    # gold 3, "3.5": error 0.5
    # MAE = (4 + 3 + 0.5) / 3 = 2.5
    # RMSE = sqrt((16 + 9 + 0.25) / 3) = sqrt(25.25 / 3)
    result = rating_metrics(["n/a", "four", "3.5"], ["1", "4", "3"], RATINGS)
    assert result["mae"] == pytest.approx(2.5)
    assert result["rmse"] == pytest.approx(math.sqrt(25.25 / 3))
    assert all(type(v) is float for v in result.values())


def test_rating_tie_goes_high_and_parseable_values_are_not_clipped():
    # gold 3, "": |1-3|=2 > |5-3|=2? no -> 5, error 2
    # gold 5, " 7 ": 7 kept as is, error 2
    # MAE = (2 + 2) / 2 = 2; RMSE = sqrt((4 + 4) / 2) = 2
    result = rating_metrics(["", " 7 "], ["3", "5"], RATINGS)
    assert result["mae"] == pytest.approx(2.0)
    assert result["rmse"] == pytest.approx(2.0)


def test_rouge_prefix_of_gold():
    # pred "the cat sat" (3 tokens), gold "the cat sat on the mat" (6 tokens)
    # unigram overlap: the 1, cat 1, sat 1 = 3 -> P=3/3, R=3/6, F=2*1*0.5/1.5 = 2/3
    # LCS "the cat sat" = 3 -> same P, R, F = 2/3
    result = generation_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert result["rouge-1"] == pytest.approx(2 / 3)
    assert result["rouge-L"] == pytest.approx(2 / 3)
    assert all(type(v) is float for v in result.values())


def test_rouge_l_follows_order():
    # pred "sat cat the" vs gold "the cat sat": unigram overlap 3 -> ROUGE-1 F = 1
    # longest common subsequence is one token long -> P=R=1/3, ROUGE-L F = 1/3
    result = generation_metrics(["sat cat the"], ["the cat sat"])
    assert result["rouge-1"] == pytest.approx(1.0)
    assert result["rouge-L"] == pytest.approx(1 / 3)


def test_rouge_zero_overlap():
    # no token in common -> P=R=F=0
    assert generation_metrics(["dog barks"], ["cat meows"]) == {"rouge-1": 0.0, "rouge-L": 0.0}


def test_rouge_does_not_stem_but_ignores_case():
    # "cats" != "cat", "running" != "run" without a stemmer -> 0
    assert generation_metrics(["cats running"], ["cat run"]) == {"rouge-1": 0.0, "rouge-L": 0.0}
    # rouge-score lowercases: "The CAT" == "the cat" -> 1
    result = generation_metrics(["The CAT"], ["the cat"])
    assert result["rouge-1"] == pytest.approx(1.0)
    assert result["rouge-L"] == pytest.approx(1.0)


def test_rouge_is_mean_over_queries_not_corpus_level():
    # query 1: "the cat sat" vs "the cat sat on the mat" -> F = 2/3 (see above)
    # query 2: "red fox" vs "red dog": overlap 1 -> P=1/2, R=1/2, F=1/2
    # mean = (2/3 + 1/2) / 2 = 7/12 ~ 0.583
    # (pooled counts would give overlap 4, P=4/5, R=4/8, F=8/13 ~ 0.615)
    preds, golds = ["the cat sat", "red fox"], ["the cat sat on the mat", "red dog"]
    per_query = per_example_rouge(preds, golds)
    assert [row["rouge-1"] for row in per_query] == pytest.approx([2 / 3, 1 / 2])
    assert [row["rouge-L"] for row in per_query] == pytest.approx([2 / 3, 1 / 2])
    result = generation_metrics(preds, golds)
    assert result["rouge-1"] == pytest.approx(7 / 12)
    assert result["rouge-L"] == pytest.approx(7 / 12)


def test_cased_rouge1_counts_the_capitals_and_punctuation_that_rouge_drops():
    preds = ["The CAT", "hey :)", "hey!!", "i cant wait!!"]
    golds = ["the cat", "hey :)", "hey", "I can't wait!"]
    # ROUGE scores the first three as full matches: it lowercases and keeps letters and digits only
    assert [row["rouge-1"] for row in per_example_rouge(preds[:3], golds[:3])] == pytest.approx([1.0, 1.0, 1.0])
    # cased: "The"/"the", "CAT"/"cat" differ -> 0; ":" and ")" match -> 1; "hey ! !" vs "hey": P=1/3, R=1 -> F=1/2;
    # "i cant wait ! !" vs "I can ' t wait !": overlap wait, ! -> P=2/5, R=2/6 -> F=2*(2/5)(1/3)/(2/5+1/3)=4/11
    assert per_example_cased_rouge1(preds, golds) == pytest.approx([0.0, 1.0, 0.5, 4 / 11])


@pytest.mark.parametrize(
    "call",
    [
        lambda p, g: classification_metrics(p, g, LABELS),
        lambda p, g: rating_metrics(p, g, RATINGS),
        generation_metrics,
        per_example_rouge,
        per_example_cased_rouge1,
    ],
    ids=["classification", "rating", "generation", "per_example_rouge", "per_example_cased_rouge1"],
)
def test_empty_and_mismatched_inputs_raise(call):
    with pytest.raises(ValueError, match="no predictions to score"):
        call([], [])
    with pytest.raises(ValueError):
        call(["a", "b"], ["a"])


def test_bootstrap_intervals_hold_the_mean_narrow_with_more_queries_and_repeat():
    from recipes.kit.metrics import bootstrap_interval

    scores = [0.1, 0.5, 0.3, 0.2, 0.9, 0.4, 0.0, 0.6]
    low, high = bootstrap_interval(scores)
    assert low < sum(scores) / len(scores) < high
    wide = high - low
    low_many, high_many = bootstrap_interval(scores * 25)
    assert high_many - low_many < wide / 3  # 25x the queries: about 1/5 the width
    assert bootstrap_interval(scores) == (low, high)  # seeded
    assert bootstrap_interval([0.4, 0.4, 0.4]) == (0.4, 0.4)
