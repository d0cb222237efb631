"""Training pairs from history: tweets get a seeded plain input, field tasks use their own fields,
pairs are stored and remade when their item changes, a held-out gold is never a target, and the
trainers (task LoRA, OPPU) train on them when asked."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import cli_fails, cli_json
from recipes.kit.history_pairs import make_pair, rewrite_tweet
from recipes.kit.tasks import get_task
from store import Behavior, Store

TWEETS = [
    "@sam_k omg sooo tired rn lol, u coming 2nite?? #mondays http://t.co/x1",
    "just woke up :| the debut last night was fun :p",
    "CANT BELIEVE IT!!! we won",
    "Home from a quick trip to the store &amp; now bed",
    "@JasonPowell some people (not me!) would say that's a good thing...",
    "idk why ppl like it tbh",
]


def test_a_tweet_becomes_a_plain_sentence_without_what_makes_it_personal():
    plain = rewrite_tweet(TWEETS[0], random.Random(0))
    for personal in ("http", "#", "sooo", "lol", "??", " u ", "2nite"):
        assert personal not in plain, plain
    assert "you" in plain and "tonight" in plain and "mondays" in plain
    assert (plain[0].isupper() or plain.startswith("@sam_k")) and plain.endswith(".")  # a leading mention stays 30% of the time
    assert rewrite_tweet(TWEETS[1], random.Random(0)) == "Just woke up the debut last night was fun."
    assert rewrite_tweet(TWEETS[2], random.Random(0)).startswith("Can't believe it!")
    assert "&" in rewrite_tweet(TWEETS[3], random.Random(0)) and "amp;" not in rewrite_tweet(TWEETS[3], random.Random(0))


def test_rewriting_is_repeatable_per_seed_and_seeds_differ():
    first = [rewrite_tweet(t, random.Random(f"1\n{t}")) for t in TWEETS]
    assert first == [rewrite_tweet(t, random.Random(f"1\n{t}")) for t in TWEETS]
    others = [[rewrite_tweet(t, random.Random(f"{seed}\n{t}")) for t in TWEETS] for seed in range(2, 8)]
    assert any(other != first for other in others)


def test_field_tasks_make_pairs_in_the_tasks_own_wording():
    news = get_task("LaMP-2N")
    item = Behavior("a1", "u", "LaMP-2N", "Stocks fell sharply.", {"text": "Stocks fell sharply.", "category": "business"})
    prompt, answer = make_pair(news, item, random.Random(0))
    assert answer == "business"
    assert prompt.startswith("Which category does this article relate to among the following categories?")
    assert prompt.endswith("article: Stocks fell sharply.") and news.query_text(prompt) == "Stocks fell sharply."
    headline = get_task("LaMP-4")
    item = Behavior("h1", "u", "LaMP-4", "Title body", {"title": "Rain again", "text": "It rained all week."})
    assert make_pair(headline, item, random.Random(0)) == ("Generate a headline for the following article: It rained all week.", "Rain again")
    no_category = Behavior("a2", "u", "LaMP-2N", "x", {"text": "x"})
    assert make_pair(news, no_category, random.Random(0)) is None


def _tweeters(tmp: Path, texts: dict[str, list[str]], golds: dict[str, str]) -> Path:
    """LaMP-7 users whose items are bare tweets; `golds` gives a user a query (split from the user id)."""
    lines = []
    for user, tweets in texts.items():
        row = {"user_id": user, "history": [{"id": f"{user}-{i}", "text": t} for i, t in enumerate(tweets)]}
        if user in golds:
            row["queries"] = [{"id": f"q{user}", "input": "Paraphrase the following tweet without any explanation before or after it: x", "output": golds[user]}]
        lines.append(json.dumps(row))
    path = tmp / "tweets.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tweet_store(tmp_path, store_path) -> Path:
    from recipes.kit.splits import user_split

    train = next(u for u in map(str, range(100, 200)) if user_split(u) == "train")
    test = next(u for u in map(str, range(100, 200)) if user_split(u) == "test")
    users = {train: TWEETS[:4] + ["the secret answer"], test: TWEETS[4:]}
    path = _tweeters(tmp_path, users, {train: "a train gold", test: "The secret answer"})
    cli_json(store_path, "ingest", str(path), "--task", "LaMP-7")
    return store_path, train, test


def test_pairs_are_shown_stored_once_and_never_target_a_held_out_gold(tweet_store):
    store, train, test = tweet_store
    shown = cli_json(store, "pairs", "show", "--user", train, "--limit", "0")
    assert shown["items"] == 5 and shown["total"] == 4  # "the secret answer" is a test user's gold
    assert all(p["output"].lower() != "the secret answer" for p in shown["pairs"])
    tweet = next(p for p in shown["pairs"] if p["item_id"] == f"{train}-0")
    assert tweet["output"] == TWEETS[0] and tweet["input"].startswith("Paraphrase the following tweet")
    assert Store(store).count("pairs") == 4
    again = cli_json(store, "pairs", "build", "--task", "LaMP-7", "--user", train)
    assert again["already_stored"] == 4 and again["pairs"] == 4 and Store(store).count("pairs") == 4
    reseeded = cli_json(store, "pairs", "show", "--user", train, "--seed", "3", "--limit", "0")
    assert reseeded["recipe"] == "rules-v1-seed3" and Store(store).count("pairs") == 8


def test_a_changed_item_gets_a_new_pair(tweet_store, tmp_path):
    store, train, _ = tweet_store
    before = {p["item_id"]: p for p in cli_json(store, "pairs", "show", "--user", train, "--limit", "0")["pairs"]}
    changed = _tweeters(tmp_path, {train: ["@bob totally different now!!!"]}, {})
    cli_json(store, "ingest", str(changed), "--task", "LaMP-7")
    after = {p["item_id"]: p for p in cli_json(store, "pairs", "show", "--user", train, "--limit", "0")["pairs"]}
    assert after[f"{train}-0"]["output"] == "@bob totally different now!!!" != before[f"{train}-0"]["output"]
    assert after[f"{train}-1"] == before[f"{train}-1"]


def test_pairs_errors_are_one_line(tweet_store):
    store, train, _ = tweet_store
    assert "--recipe llm: expected one of none, rules" in cli_fails(store, "pairs", "show", "--user", train, "--recipe", "llm")
    assert "no user 'nobody'" in cli_fails(store, "pairs", "show", "--user", "nobody")
    assert "exactly one of --user, --split or --users" in cli_fails(store, "pairs", "build", "--task", "LaMP-7")


def test_the_task_lora_and_oppu_train_on_history_pairs_when_asked(tweet_store, tiny_llm_dir):
    store, train, test = tweet_store
    llm = ["--llm", str(tiny_llm_dir), "--precision", "float32", "--steps", "1", "--batch-size", "2"]
    plain = cli_json(store, "adapt", "--task", "LaMP-7", "--name", "plain", *llm)
    paired = cli_json(store, "adapt", "--task", "LaMP-7", "--name", "paired", "--pairs", "rules", *llm)
    assert plain["train_examples"] == 1 and plain["history_pairs"] == 0
    assert paired["train_examples"] == 5 and paired["history_pairs"] == 4  # the train user's query + 4 pairs
    first = cli_json(store, "train-oppu", "--task", "LaMP-7", "--user", test, "--base", "none", *llm)
    again = cli_json(store, "train-oppu", "--task", "LaMP-7", "--user", test, "--base", "none", "--pairs", "rules", *llm)
    assert first["trained"] == 1 and again["trained"] == 1 and test in again["stale"]  # other examples: trained again


def test_rag_training_shows_a_pair_the_users_other_items_never_its_own(tweet_store, tiny_llm_dir, tokenizer_dir):
    """--rag-k: each history pair's prompt retrieves from the rest of the history, so the answer is never shown."""
    from transformers import AutoTokenizer

    from recipes.kit.prompts import TokenBudget
    from recipes.kit.training_data import Retrieval, train_user_pairs

    store, train, _ = tweet_store
    task = get_task("LaMP-7")
    retrieval = Retrieval(task, TokenBudget(AutoTokenizer.from_pretrained(tokenizer_dir), 512), 2)
    examples = train_user_pairs(Store(store), task, [train], "rules", 0, retrieval)
    assert len(examples) == 4
    for example in examples:
        shown = example.prompt.split("\n\n")[0].splitlines()
        assert shown[0] == task.rag_header and len(shown) == 3
        texts = [line.strip('"') for line in shown[1:]]
        assert all(t in TWEETS[:4] + ["the secret answer"] for t in texts) and example.target not in texts
    rag = cli_json(store, "adapt", "--task", "LaMP-7", "--name", "rag2", "--pairs", "rules", "--rag-k", "2",
                   "--llm", str(tiny_llm_dir), "--precision", "float32", "--steps", "1", "--batch-size", "2")  # fmt: skip
    assert rag["train_examples"] == 5 and Store(store).get_plugin("rag2").config["rag_k"] == 2
    assert "--rag-k must be 0 (no retrieval) or more" in cli_fails(store, "adapt", "--task", "LaMP-7", "--rag-k", "-1")
    similar = cli_json(store, "adapt", "--task", "LaMP-7", "--name", "rag2-sim", "--rag-k", "2", "--rag-min-similarity", "0.4",
                       "--llm", str(tiny_llm_dir), "--precision", "float32", "--steps", "1", "--batch-size", "2")  # fmt: skip
    assert similar["train_examples"] == 1 and Store(store).get_plugin("rag2-sim").config["rag_min_similarity"] == 0.4
    assert "--rag-min-similarity goes with --rag-k K" in cli_fails(store, "adapt", "--task", "LaMP-7", "--rag-min-similarity", "0.4")
    assert "--rag-min-similarity is a cosine similarity in [-1, 1], got 2.0" in cli_fails(
        store, "adapt", "--task", "LaMP-7", "--rag-k", "2", "--rag-min-similarity", "2")
    assert "--min-similarity goes with --method rag" in cli_fails(store, "evaluate", "--task", "LaMP-7", "--min-similarity", "0.4")


def test_assembly_reads_history_as_the_pool_was_trained_or_as_plain_text(tweet_store, tiny_llm_dir, monkeypatch):
    """A pool trained on rules pairs is assembled from the target's pairs by default; --history-format
    text reads each item's text alone (what makes assembly faster), and the stored record says which."""
    import recipes.methods.perpcs.assembly as assembly

    store, train, test = tweet_store
    llm = ["--llm", str(tiny_llm_dir), "--precision", "float32"]
    cli_json(store, "register-sharers", "--task", "LaMP-7", "--sharer", train, "--pairs", "rules", "--steps", "1", "--gate-steps", "1", *llm)
    read, real = [], assembly.assemble_user

    def reading(llm, pool, examples, *rest):
        read.append(examples)
        return real(llm, pool, examples, *rest)

    monkeypatch.setattr(assembly, "assemble_user", reading)
    for form in ("task", "text"):
        cli_json(store, "assemble", "--task", "LaMP-7", "--user", test, "--history-format", form, *llm)
    as_task, as_text = read
    assert [e.target for e in as_task] == [e.target for e in as_text] == TWEETS[4:]
    assert all(e.prompt.startswith("Paraphrase the following tweet") for e in as_task)
    assert all(e.prompt is None for e in as_text)
    assert Store(store).list_assemblies("LaMP-7", test)[-1].config["history_format"] == "text"
    assert "--history-format json: expected one of task, text" in cli_fails(store, "assemble", "--task", "LaMP-7", "--user", test, "--history-format", "json")
