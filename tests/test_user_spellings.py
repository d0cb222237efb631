"""User spellings (--user-spellings): the LLM's answer spells common words the way the user's own
history does; its ablation spells them the donor's way. Mechanics of the rule on hand-made
histories; the flow through `evaluate` and `generate` on the embedded SmolLM2 (its standard
English is what gets respelled)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli_fails, cli_json, ingested, run_outputs
from recipes.kit.tasks import get_task
from recipes.methods.user_spellings import respell, user_spellings
from store import Behavior, Store

PROMPT = "Paraphrase the following tweet without any explanation before or after it: "
TWEETS = get_task("LaMP-7")
KAI = {"you": "u", "are": "r", "i'm": "im"}


def _history(*texts: str) -> list[Behavior]:
    return [Behavior(f"h{n}", "u", TWEETS.name, text) for n, text in enumerate(texts)]


def test_a_short_spelling_is_adopted_only_where_the_history_prefers_it():
    history = _history("u coming 2nite?", "where r u", "thank you so much", "im late, r u there", "I'm home")
    assert user_spellings(TWEETS, history, 1) == {"you": "u", "are": "r", "tonight": "2nite"}  # im 1 = I'm 1: not preferred
    assert user_spellings(TWEETS, history, 2) == {"you": "u", "are": "r"}  # 2nite only once
    assert user_spellings(TWEETS, _history("Thank you, you are kind", "see u"), 1) == {}  # 'you' outnumbers 'u'


def test_respelling_swaps_whole_words_and_keeps_a_capital():
    spellings = {"you": "u", "are": "r", "i'm": "im"}
    assert respell("You are late. I'm sure you know, young one.", spellings) == "U r late. Im sure u know, young one."
    assert respell("I\u2019m yours", spellings) == "Im yours"  # a typographic apostrophe is the same word
    assert respell("nothing to change", {}) == "nothing to change"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Kai writes 'u', 'r' and 'im'; Lee writes standard English. They ask the same question."""
    kai = ["u r the best", "r u coming", "see u soon", "im here, u know it"]
    lee = ["You are the best", "Are you coming", "See you soon", "You know it"]
    users = [
        {"user_id": user, "history": [{"id": f"{user}-h{n}", "text": text} for n, text in enumerate(items)],
         "queries": [{"id": f"{user}-q", "input": PROMPT + "Are you coming to the party tonight? You are invited.", "output": "x"}]}
        for user, items in (("kai", kai), ("lee", lee))
    ]  # fmt: skip
    return ingested(tmp_path, users)


def test_evaluate_spells_each_answer_its_users_way_and_the_ablation_the_donors(store):
    common = ["evaluate", "--task", "LaMP-7", "--split", "all", "--max-new-tokens", "24", "--method", "rag"]
    plain = run_outputs(store, cli_json(store, *common))
    own = cli_json(store, *common, "--user-spellings", "1")
    assert own["method"] == "rag-bm25-k1+spell1" and own["config"]["spelling_min_count"] == 1 and own["config"]["respelled"] == 1
    answers = run_outputs(store, own)
    assert answers["kai-q"] == respell(plain["kai-q"], KAI) != plain["kai-q"]  # the model writes standard English
    assert answers["lee-q"] == plain["lee-q"]  # Lee's own history spells it the standard way
    # the ablation reads donors' histories; with two users they swap: Kai's spellings reach Lee's answer
    donors_plain = run_outputs(store, cli_json(store, *common, "--ablation"))
    donors_spelled = run_outputs(store, cli_json(store, *common, "--ablation", "--user-spellings", "1"))
    assert donors_spelled["lee-q"] == respell(donors_plain["lee-q"], KAI) != donors_plain["lee-q"]
    assert donors_spelled["kai-q"] == donors_plain["kai-q"]


def test_generate_spells_the_answer_the_users_way(store):
    out = cli_json(store, "generate", PROMPT + "Are you coming to the party tonight?", "--user", "kai", "--user-spellings", "1", "--max-new-tokens", "24")
    plain = cli_json(store, "generate", PROMPT + "Are you coming to the party tonight?", "--user", "kai", "--max-new-tokens", "24")
    assert out["respelled"] is True and out["output"] == respell(plain["output"], KAI) != plain["output"]


def test_bad_counts_and_label_tasks_are_one_line_and_write_nothing(store):
    before = Store(store).info()["tables"]
    assert "--user-spellings" in cli_fails(store, "evaluate", "--task", "LaMP-7", "--user-spellings", "0")
    assert "LaMP-2N answers with labels" in cli_fails(store, "evaluate", "--task", "LaMP-2N", "--user-spellings", "1")
    assert Store(store).info()["tables"] == before
