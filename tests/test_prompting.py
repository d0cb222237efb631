"""Task registry, retrieval and prompt building: pure functions, no model needed."""

from __future__ import annotations

import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from recipes import PersonaError
from types import SimpleNamespace

from recipes.kit.prompts import PromptContext, PromptSettings, TokenBudget, history_prompt
from recipes.methods.pag import profile_prompt, profile_request
from recipes.methods.rag import retrieved_items
from recipes.methods.registry import get_method, parse_method
from recipes.kit.retrieval import bm25_top, random_items, recency_top
from recipes.kit.splits import query_split, user_split
from recipes.kit.tasks import TASKS, get_task
from store import Behavior, Query

NEWS = get_task("LaMP-2N")
TWEETS = get_task("LaMP-7")


@pytest.fixture(scope="module")
def budget(tokenizer_dir):
    return TokenBudget(AutoTokenizer.from_pretrained(tokenizer_dir), 256)


def _history(texts: list[str], **fields) -> list[Behavior]:
    return [Behavior(f"#{i}", "u", "LaMP-7", t, {"text": t, **fields}, vector=None) for i, t in enumerate(texts)]


def test_every_lamp_task_is_registered_with_its_metrics():
    assert list(TASKS) == ["LaMP-1", "LaMP-2", "LaMP-2N", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-6", "LaMP-7"]
    assert TASKS["LaMP-1"].labels == ("[1]", "[2]") and TASKS["LaMP-3"].labels == ("1", "2", "3", "4", "5")
    assert len(TASKS["LaMP-2"].labels) == 15 and len(NEWS.labels) == 15
    assert NEWS.metric_names == ("accuracy", "f1") and TASKS["LaMP-3"].metric_names == ("mae", "rmse")
    assert TWEETS.metric_names == ("rouge-1", "rouge-L") and get_task("my-task").metric_names == ("rouge-1", "rouge-L")
    # the cased ROUGE-1 is reported beside LaMP's ROUGE, never among its metric names
    assert TWEETS.supplementary_metric_names == ("rouge-1-cased",) and NEWS.supplementary_metric_names == ()
    # cased: only "am" of I am HERE ! ! (5 tokens) is in i am here (3): F = 2 (1/5)(1/3) / (1/5 + 1/3) = 0.25
    assert TWEETS.score(["I am HERE!!"], ["i am here"]) == {"rouge-1": 1.0, "rouge-L": 1.0, "rouge-1-cased": pytest.approx(0.25)}
    assert get_task("lamp_2n") is NEWS and NEWS.lamp_name == "LaMP_2N"


@pytest.mark.parametrize(
    "task,text,expected",
    [
        ("LaMP-2N", " Travel. ", "travel"),
        ("LaMP-2N", '"style & beauty"', "style & beauty"),
        ("LaMP-2N", 'The category is "politics", not business', "politics"),
        ("LaMP-2N", "I cannot tell", "I cannot tell"),
        ("LaMP-1", "[2]", "[2]"),
        ("LaMP-1", "2", "[2]"),
        ("LaMP-3", "4 stars", "4"),
        ("LaMP-3", "five", "five"),
        ("LaMP-7", "  a tweet!  ", "a tweet!"),
        ("LaMP-7", 'Here is the paraphrased tweet: "I love it"', "I love it"),
        ("LaMP-7", '"my tweet"\n\nThe original tweet is: more', "my tweet"),
        ("LaMP-7", "@bob: hi there", "@bob: hi there"),
        ("LaMP-5", "Title: A new method", "A new method"),
    ],
)
def test_answers_are_normalized_onto_the_label_set(task, text, expected):
    assert get_task(task).normalize(text) == expected


def test_the_query_is_the_part_after_the_tasks_prefix():
    news = "Which category does this article relate to? categories: [women, travel] article: Cheap flights to Rome"
    assert NEWS.query_text(news) == "Cheap flights to Rome"
    tweet = "Paraphrase the following tweet without any explanation before or after it: I love my bike"
    assert TWEETS.query_text(tweet) == "I love my bike"
    citation = 'For an author who has written the paper with the title "X", which reference is related? [1]: "Deep nets" [2]: "Tax law"'
    assert get_task("LaMP-1").query_text(citation) == "Deep nets Tax law"
    assert TWEETS.query_text("no prefix here") == "no prefix here"


def test_bm25_recency_and_random_choices():
    docs = ["cycling up the hill today", "my tax form is due", "new bike, new me", "cooking pasta again"]
    assert bm25_top(docs, "I bought a bike for cycling", 2) == [0, 2] or bm25_top(docs, "I bought a bike for cycling", 2) == [2, 0]
    assert bm25_top(docs, "pasta", 1) == [3] and bm25_top(docs, "the", 2) == [0, 1]  # stopwords only: history order
    assert bm25_top(docs, "bike", 10) == bm25_top(docs, "bike", 4) and len(bm25_top(docs, "bike", 10)) == 4
    assert recency_top(_history(docs), 2) == [3, 2]
    first = random_items(50, 5, seed=0, key="q1")
    assert first == random_items(50, 5, seed=0, key="q1") and len(set(first)) == 5
    assert first != random_items(50, 5, seed=1, key="q1") and first != random_items(50, 5, seed=0, key="q2")


def test_dense_choice_uses_the_stored_vectors():
    history = _history(["a", "b", "c"])
    for item, vector in zip(history, np.eye(3, dtype=np.float32)):
        item.vector = vector
    query = Query("q", "u", "LaMP-7", "x")
    ctx = _context({}, PromptSettings(k=2, retriever="dense"), None)
    chosen = retrieved_items(ctx, query, history, np.array([0.1, 0.0, 0.9], np.float32))
    assert [i.text for i in chosen] == ["c", "a"]


def test_rag_prompt_keeps_to_the_token_budget(budget):
    long_history = _history([f"tweet number {i} " + "words " * 40 for i in range(30)])
    task_input = "Paraphrase the following tweet without any explanation before or after it: hello"
    prompt = history_prompt(TWEETS, task_input, long_history, budget)
    assert budget.count(prompt) <= budget.limit and prompt.endswith(task_input)
    assert prompt.startswith(TWEETS.rag_header) and '"tweet number 0' in prompt and "tweet number 29" not in prompt
    assert history_prompt(TWEETS, task_input, [], budget) == task_input


def test_news_items_show_the_users_own_labels(budget):
    items = [Behavior("1", "u", "LaMP-2N", "Flights to Rome", {"text": "Flights to Rome", "category": "travel"})]
    prompt = history_prompt(NEWS, "article: x", items, budget)
    assert '"travel" is the category of the article "Flights to Rome"' in prompt
    assert NEWS.rank_answers()[:2] == ['"women"', '"religion"']


def _context(histories: dict, settings: PromptSettings, budget) -> PromptContext:
    """A prompt context over an in-memory history (the store's one read) and the budget's tokenizer."""
    store = SimpleNamespace(histories=lambda users, task, with_vectors=False: {u: histories[u] for u in users if u in histories})
    llm = SimpleNamespace(tokenizer=budget.tokenizer if budget else None)
    return PromptContext(store, llm, TWEETS, settings, max_input_tokens=256)


def test_prompt_methods_build_their_prompts(budget):
    history = {"u": _history(["cycling up the hill", "tax form due", "new bike day"])}
    queries = [Query("q1", "u", "LaMP-7", "Paraphrase the following tweet without any explanation before or after it: my bike")]
    none, _ = get_method("none").prompts(_context(history, PromptSettings(), budget), queries)
    rag, _ = get_method("rag").prompts(_context(history, PromptSettings(k=1), budget), queries)
    assert none == [queries[0].input]
    assert rag[0].splitlines()[1] == '"new bike day"'
    pag = profile_prompt(TWEETS, queries[0].input, "Loves bikes.")
    assert pag.startswith("About this user: Loves bikes.") and pag.endswith(queries[0].input)
    request = profile_request(TWEETS, history["u"], budget)
    assert request.startswith(TWEETS.pag_instruction) and request.index("new bike day") < request.index("cycling")


@pytest.mark.parametrize(
    "settings,message",
    [
        (PromptSettings(retriever="tfidf"), "--retriever tfidf: expected one of"),
        (PromptSettings(k=0), "--k must be at least 1"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(PersonaError, match=message):
        settings.validate()


def test_the_user_split_is_fixed_and_roughly_70_10_20():
    ids = [str(i) for i in range(5000)]
    counts = {s: sum(user_split(u) == s for u in ids) for s in ("train", "dev", "test")}
    assert abs(counts["train"] / 5000 - 0.7) < 0.03 and abs(counts["test"] / 5000 - 0.2) < 0.03
    assert [user_split(str(i)) for i in range(6)] == ["train", "train", "test", "train", "test", "train"]
    assert query_split("dev", "2") == "dev" and query_split(None, "2") == "test"


def test_the_registry_parses_method_names():
    assert [m.name if m else None for m in parse_method("rag")] == [None, "rag"]
    assert [m.name for m in parse_method("oppu")] == ["oppu", "none"]
    assert [m.name for m in parse_method("perpcs+rag")] == ["perpcs", "rag"]
    for bad in ("few-shot", "task-lora+rag", "rag+oppu", "oppu+perpcs"):
        with pytest.raises(PersonaError, match=re.escape(f"--method {bad}: expected one of")):
            parse_method(bad)


def test_rag_training_prompts_are_the_prompts_rag_serves(budget):
    """A model adapted with --rag-k K must read at serving time exactly the prompt it was trained on."""
    from recipes.kit.training_data import Retrieval

    history = {"u": _history(["cycling up the hill", "tax form due", "new bike day", "bike shop visit"])}
    query = Query("q1", "u", "LaMP-7", "Paraphrase the following tweet without any explanation before or after it: my bike")
    served, _ = get_method("rag").prompts(_context(history, PromptSettings(k=2), budget), [query])
    store = SimpleNamespace(histories=lambda users, task, with_vectors=False: {u: history[u] for u in users})
    retrieval = Retrieval(TWEETS, TokenBudget(budget.tokenizer, 256), 2)
    assert retrieval.query_examples(store, [query]) == []  # a query without a gold output trains nothing
    [example] = retrieval.query_examples(store, [Query("q1", "u", "LaMP-7", query.input, output="my new bike!!")])
    assert example.prompt == served[0] and example.target == "my new bike!!"
    assert example.prompt.count("bike") == 3  # the two bike items, then the query


def test_rag_training_prompts_with_a_similarity_threshold_are_the_prompts_served(budget):
    from recipes.kit.training_data import Retrieval

    history = _with_vectors({"u": _history(["bike up the hill", "tax form due", "lake bike ride"])})
    query = Query("q1", "u", "LaMP-7", "Paraphrase the following tweet without any explanation before or after it: bike tax")
    settings = PromptSettings(k=3, min_similarity=0.6)
    served, _ = get_method("rag").prompts(_similarity_context(history, settings, budget), [query])
    store = SimpleNamespace(histories=lambda users, task, with_vectors=False: {u: history[u] for u in users})
    retrieval = Retrieval(TWEETS, TokenBudget(budget.tokenizer, 256), 3, 0.6, _WordEncoder())
    [example] = retrieval.query_examples(store, [Query("q1", "u", "LaMP-7", query.input, output="bike tax!")])
    assert example.prompt == served[0]
    assert '"tax form due"' in served[0] and "hill" not in served[0]  # cosine 0.71 in, 0.5 and 0.5 out


class _WordEncoder:
    """A stand-in encoder: one unit axis per known word, so cosines are exact fractions."""

    id, dim = "words", 4
    WORDS = ("bike", "tax", "hill", "lake")

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = np.array([[float(w in t.lower()) for w in self.WORDS] for t in texts], np.float32)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


def _with_vectors(histories: dict) -> dict:
    for user, items in histories.items():
        vectors = _WordEncoder().encode([item.text for item in items])
        for item, vector in zip(items, vectors):
            item.user_id, item.vector = user, vector
    return histories


def _similarity_context(histories: dict, settings: PromptSettings, budget) -> PromptContext:
    ctx = _context(histories, settings, budget)
    ctx.store.check_encoder = lambda encoder_id, dim: None
    ctx.load_encoder = _WordEncoder
    return ctx


def test_rag_min_similarity_leaves_out_items_unlike_the_input(budget):
    """Only retrieved items alike to the input are shown; with none alike the prompt is k=0's, for
    the user and for the ablation (so an unrelated donor history changes nothing)."""
    history = _with_vectors({
        "a": _history(["bike up the hill", "tax form due"]),
        "b": _history(["tax day again", "the lake at dawn"]),
    })  # fmt: skip
    ask = "Paraphrase the following tweet without any explanation before or after it: "
    queries = [Query("qa", "a", "LaMP-7", ask + "my bike and the hill"), Query("qb", "b", "LaMP-7", ask + "tax")]
    rag = get_method("rag")
    plain, _ = rag.prompts(_context(history, PromptSettings(k=2), budget), queries)
    assert plain[0].count('"') == 4 and plain[1].count('"') == 4  # both items of each user, whatever they say
    kept, facts = rag.prompts(_similarity_context(history, PromptSettings(k=2, min_similarity=0.5), budget), queries)
    assert kept[0].splitlines()[1:3] == ['"bike up the hill"', ""] and kept[1].splitlines()[1] == '"tax day again"'
    assert facts["encoder"] == "words"
    donated, _ = rag.prompts(_similarity_context(history, PromptSettings(k=2, min_similarity=0.5, ablation=True), budget), queries)
    assert donated[0] == queries[0].input  # nothing of b's is about bikes or hills: the k=0 prompt
    assert donated[1].splitlines()[1:3] == ['"tax form due"', ""]  # b's donor a: the tax item passes, the bike item does not
    with pytest.raises(PersonaError, match="--min-similarity is a cosine similarity in \\[-1, 1\\], got 1.5"):
        PromptSettings(min_similarity=1.5).validate()


def test_rag_ablation_shows_another_users_items_chosen_the_same_way(budget):
    history = {
        "a": _history(["my bike is red", "tax day"]),
        "b": _history(["bike ride to the lake", "pasta night"]),
        "c": _history(["new bike for my son", "rainy day"]),
    }
    for user, items in history.items():
        for item in items:
            item.user_id = user
    tweet = "Paraphrase the following tweet without any explanation before or after it: a bike"
    queries = [Query(f"q{u}", u, "LaMP-7", tweet) for u in history]
    own, _ = get_method("rag").prompts(_context(history, PromptSettings(k=1), budget), queries)
    swapped, facts = get_method("rag").prompts(_context(history, PromptSettings(k=1, ablation=True), budget), queries)
    shown = lambda prompt: prompt.splitlines()[1].strip('"')  # noqa: E731
    owners = {item.text: user for user, items in history.items() for item in items}
    assert [owners[shown(p)] for p in own] == ["a", "b", "c"]
    assert all(owners[shown(p)] != q.user_id for p, q in zip(swapped, queries))
    assert sorted(owners[shown(p)] for p in swapped) == ["a", "b", "c"] and "bike" in " ".join(map(shown, swapped))
    assert "another user's history" in facts["ablation"]
    for query, prompt in zip(queries, swapped):  # one user's shard (a Ray worker's part) gets the same donor
        served = PromptSettings(k=1, ablation=True, served=tuple(history))
        assert get_method("rag").prompts(_context(history, served, budget), [query])[0] == [prompt]
    with pytest.raises(PersonaError, match="--ablation of rag .* at least 2 users"):
        get_method("rag").prompts(_context(history, PromptSettings(k=1, ablation=True), budget), queries[:1])


def test_generate_ablation_for_one_user_takes_a_named_donor(store_path, tiny_llm_dir):
    """`generate --ablation --donor D`: one user's query answered with D's history (the derangement
    the ablation draws needs two users); refused where it would mean nothing, before a model loads."""
    from conftest import EXAMPLES, cli_fails, cli_json

    cli_json(store_path, "ingest", str(EXAMPLES), "--task", "LaMP-7")
    ask = ["--method", "rag", "--k", "2", "--llm", str(tiny_llm_dir), "--max-new-tokens", "2"]
    text = "Paraphrase the following tweet without any explanation before or after it: the train ride was my favorite"
    items = lambda answer: [line.strip('"') for line in answer["prompt"].splitlines() if line.startswith('"')]  # noqa: E731
    own = items(cli_json(store_path, "generate", "--user", "0", *ask, text))
    donated_answer = cli_json(store_path, "generate", "--user", "0", *ask, "--ablation", "--donor", "1", text)
    donated = items(donated_answer)
    assert donated_answer["donor"] == "1"
    assert len(own) == len(donated) == 2
    assert all(item == item.lower() for item in own)  # user 0 writes in lowercase
    assert all(item == item.upper() for item in donated)  # user 1, the donor, in capitals
    for extra, message in [
        (["--donor", "1"], "--donor goes with --ablation"),
        (["--ablation", "--donor", "0"], "the donor must be another user"),
        (["--ablation", "--donor", "nobody"], "--donor nobody: no such user"),
    ]:  # fmt: skip
        assert message in cli_fails(store_path, "generate", "--user", "0", "--method", "rag", "--llm", "/nonexistent", *extra, text)
    refused = cli_fails(store_path, "generate", "--user", "0", "--method", "style-vector", "--ablation", "--donor", "1", "--llm", "/nonexistent", text)
    assert "reads no other user's history" in refused
