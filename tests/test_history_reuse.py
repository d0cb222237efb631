"""History reuse (--reuse-history): an input that nearly repeats one of the user's own history
items is answered with that item's answer, everything else by the method; its ablation reuses a
donor's history. Mechanics on a tiny random LLM, whose own answers never equal a user's item."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli_fails, cli_json, ingested, run_outputs
from recipes.kit.tasks import get_task
from recipes.methods.history_reuse import reused_answers
from store import Behavior, Query, Store

PROMPT = "Paraphrase the following tweet without any explanation before or after it: "
ANNA = [("The museum is free on Sundays.", "the museum is free on sundays!! :)"), ("We took the train to the coast.", "train to the coast w/ the crew")]
BERT = [("My garden grew huge tomatoes this year.", "MY GARDEN GREW HUGE TOMATOES THIS YEAR"), ("The bakery opened early today.", "BAKERY OPEN EARLY TODAY")]


def _user(user_id: str, items: list[tuple[str, str]], queries: list[tuple[str, str]]) -> dict:
    history = [{"id": f"{user_id}-h{n}", "input": given, "text": text, "timestamp": f"2024-01-0{n + 1}T10:00:00"} for n, (given, text) in enumerate(items)]
    asked = [{"id": f"{user_id}-q{n}", "input": PROMPT + text, "output": gold} for n, (text, gold) in enumerate(queries)]
    return {"user_id": user_id, "history": history, "queries": asked}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Anna asks about the museum again (and one new thing); Bert asks two new things."""
    users = [
        _user("anna", ANNA, [("The museum is free on Sundays again.", "museum free on sundays again!!"), ("I lost my umbrella.", "lost my umbrella :(")]),
        _user("bert", BERT, [("The museum is free on Sundays.", "MUSEUM FREE SUNDAYS"), ("Rain all week.", "RAIN ALL WEEK")]),
    ]
    return ingested(tmp_path, users)


def test_an_input_that_repeats_a_history_item_gets_the_users_own_answer(store, tiny_llm_dir):
    common = ["evaluate", "--task", "LaMP-7", "--split", "all", "--llm", str(tiny_llm_dir), "--max-new-tokens", "6"]
    plain, reused = cli_json(store, *common), cli_json(store, *common, "--reuse-history", "0.6")
    assert reused["method"] == "none+reuse0.6" and reused["config"]["reuse_min_overlap"] == 0.6 and reused["config"]["reused"] == 1
    before, after = run_outputs(store, plain), run_outputs(store, reused)
    assert after["anna-q0"] == "the museum is free on sundays!! :)"  # Anna's own earlier words, not the model's
    assert before["anna-q0"] != after["anna-q0"]
    # Bert asks the same thing but never wrote it: the model answers him, as it answers every other query
    assert {q: after[q] for q in after if q != "anna-q0"} == {q: before[q] for q in before if q != "anna-q0"}


def test_the_ablation_reuses_a_donors_history_instead_of_the_users_own(store, tiny_llm_dir):
    common = ["evaluate", "--task", "LaMP-7", "--split", "all", "--llm", str(tiny_llm_dir), "--max-new-tokens", "6",
              "--method", "rag", "--reuse-history", "0.6"]  # fmt: skip
    own, ablation = cli_json(store, *common), cli_json(store, *common, "--ablation")
    assert own["config"]["reused"] == 1 and run_outputs(store, own)["anna-q0"] == "the museum is free on sundays!! :)"
    # with two users the donors swap: Bert's question about the museum now finds Anna's item
    assert ablation["method"] == "rag-bm25-k1-ablation+reuse0.6" and ablation["config"]["reused"] == 1
    assert run_outputs(store, ablation)["bert-q0"] == "the museum is free on sundays!! :)"


def test_generate_answers_a_repeat_from_history_without_loading_a_model(store, tmp_path):
    missing = tmp_path / "no-model-here"
    out = cli_json(store, "generate", PROMPT + "The museum is free on Sundays again.", "--user", "anna", "--reuse-history", "0.6", "--llm", str(missing))
    assert out["reused"] is True and out["output"] == "the museum is free on sundays!! :)" and out["llm"] == ""


def test_a_threshold_outside_0_to_1_is_one_line_and_writes_nothing(store):
    before = Store(store).info()["tables"]
    assert "--reuse-history is a ROUGE-1 overlap in (0, 1], got 1.5" in cli_fails(store, "evaluate", "--task", "LaMP-7", "--reuse-history", "1.5")
    assert Store(store).info()["tables"] == before


def test_label_tasks_reuse_the_label_the_user_gave_a_nearly_identical_item():
    task = get_task("LaMP-2N")
    history = [
        Behavior("h1", "u", task.name, "Senate passes the budget bill after a long night", {"text": "Senate passes the budget bill after a long night", "category": "politics"}),
        Behavior("h2", "u", task.name, "A new pasta recipe for busy weeknights", {"text": "A new pasta recipe for busy weeknights", "category": "food & drink"}),
    ]
    ask = lambda text: Query("q", "u", task.name, task.query_template.format(input=text))  # noqa: E731
    answers = reused_answers(task, [ask("Senate passes the budget bill after a long night of debate"), ask("Storms close schools")], {"u": history}, 0.5)
    assert answers == ["politics", None]
