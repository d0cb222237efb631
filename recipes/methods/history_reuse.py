"""History reuse: a query that nearly repeats one of the user's own earlier items is answered with
that item's answer; the method answers every other query.

Users repeat themselves. Among the 818 training-split users of LaMP-7, 12 tweets to paraphrase
are in the user's own history word for word, and more nearly so; no model re-creates them as well
as the history holds them. How alike a query and an item are is ROUGE-1 F (the task's own metric
for words in common) between the query's searched text (`Task.query_text`) and the item's input
side: an item's own `input` (answered with its `output` or text); for a task whose items hold
both sides (`Task.pair_fields`, e.g. LaMP-2N's article and category) the input field, answered
with the answer field; otherwise (LaMP-7 tweets) the item's text, which is also its answer. It is a stage any method's answers pass
through (`--reuse-history MIN`), not a method of its own; its non-personal ablation reads a donor's
history (the derangement every ablation uses), so what it adds is the user's own items at work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from recipes import PersonaError
from recipes.kit.history_pairs import item_sides
from recipes.kit.tasks import Task
from store import Behavior, Query

if TYPE_CHECKING:
    from rouge_score import rouge_scorer


def check_min_overlap(value: Optional[float], flag: str = "--reuse-history") -> None:
    """An overlap threshold is a ROUGE-1 F in (0, 1] (None: no reuse)."""
    if value is not None and not 0.0 < value <= 1.0:
        raise PersonaError(f"{flag} is a ROUGE-1 overlap in (0, 1], got {value}")


def reuse_sides(task: Task, item: Behavior) -> Optional[tuple[str, str]]:
    """(what a query is compared with, the answer the item gives): the sides a training pair of the
    item has (history_pairs.item_sides), or for a task without pair fields its text for both (a
    tweet is its own answer); None for an item of a pair task that lacks a side."""
    sides = item_sides(task, item)
    if sides is None and task.pair_fields is None:
        return item.text, item.text
    return sides


def closest_item(task: Task, text: str, history: list[Behavior], scorer: rouge_scorer.RougeScorer) -> tuple[float, Optional[str]]:
    """(ROUGE-1 F, answer) of the history item whose input side overlaps `text` most (the earliest
    on ties); (0.0, None) for a history without answers."""
    best: tuple[float, Optional[str]] = (0.0, None)
    for item in history:
        sides = reuse_sides(task, item)
        if sides is None or not sides[1].strip():
            continue
        source, answer = sides
        overlap = scorer.score(text, source)["rouge1"].fmeasure
        if overlap > best[0]:
            best = (overlap, answer)
    return best


def reused_answers(task: Task, queries: list[Query], histories: dict[str, list[Behavior]], min_overlap: float) -> list[Optional[str]]:
    """Per query, the answer of its user's closest history item when that overlaps the query by at
    least `min_overlap`, else None (the method answers it). `histories` maps each query's user to
    the history to reuse (their own, or a donor's for the ablation)."""
    from rouge_score import rouge_scorer  # loads nltk: only where reuse runs

    check_min_overlap(min_overlap)
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    answers: list[Optional[str]] = []
    for query in queries:
        overlap, answer = closest_item(task, task.query_text(query.input), histories.get(query.user_id, []), scorer)
        answers.append(answer if answer is not None and overlap >= min_overlap else None)
    return answers
