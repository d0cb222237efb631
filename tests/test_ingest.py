"""Ingest through the library: both input formats, real embeddings, idempotence, encoder checks."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import EXAMPLES, read_jsonl, shared
from recipes.kit.inputs import read_lamp_outputs, read_lamp_questions, read_users_jsonl
from recipes.flows.ingest import ingest, lamp_source, users_jsonl_source
from recipes.kit.tasks import get_task
from store import Store, StoreError


def test_example_users_ingest_with_normalized_vectors(store_path, encoder):
    store = Store(store_path)
    summary = ingest(store, users_jsonl_source(EXAMPLES, get_task("LaMP-7")), encoder)
    expected = read_jsonl(EXAMPLES)
    assert summary["users"] == len(expected) == 48
    assert summary["items"] == sum(len(u["history"]) for u in expected)
    assert summary["queries"] == 144
    history = store.user_history("4", with_vectors=True)
    assert [b.text for b in history] == [h["text"] for h in expected[4]["history"]]
    norms = np.linalg.norm(np.stack([b.vector for b in history]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert {b.encoder for b in history} == {"all-MiniLM-L6-v2"}
    assert history[0].fields["input"] == expected[4]["history"][0]["input"]
    assert store.get_user("4").metadata == {"style": "british"}
    assert store.user_queries("4")[0].output == expected[4]["queries"][0]["output"]


def test_reingest_is_idempotent_and_updates(tmp_path, store_path, encoder, few_users):
    store = Store(store_path)
    ingest(store, users_jsonl_source(few_users, get_task("LaMP-7")), encoder)
    counts = {n: store.count(n) for n in ("users", "behaviors", "queries")}
    ingest(store, users_jsonl_source(few_users, get_task("LaMP-7")), encoder)
    assert {n: store.count(n) for n in ("users", "behaviors", "queries")} == counts
    users = read_jsonl(few_users)
    users[0]["history"][0]["text"] = "a brand new text"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(json.dumps(u) for u in users), encoding="utf-8")
    ingest(store, users_jsonl_source(edited, get_task("LaMP-7")), encoder)
    assert {n: store.count(n) for n in ("users", "behaviors", "queries")} == counts
    assert store.user_history(users[0]["user_id"])[0].text == "a brand new text"


def test_lamp1_sample_embeds_title_and_abstract(store_path, encoder):
    questions = shared("samples", "lamp1_train_questions.json")
    outputs = shared("samples", "lamp1_train_outputs.json")
    store = Store(store_path)
    summary = ingest(store, lamp_source(questions, get_task("LaMP-1"), outputs, "train"), encoder)
    raw = json.loads(questions.read_text())
    assert summary["users"] == len(raw) and summary["items"] == sum(len(q["profile"]) for q in raw)
    first = raw[0]["profile"][0]
    item = next(b for b in store.user_history(raw[0]["id"]) if b.item_id == first["id"])
    assert item.text == f"{first['title']} {first['abstract']}"
    query = store.user_queries(raw[0]["id"])[0]
    assert (query.output, query.split, query.task) == ("[1]", "train", "LaMP-1")


def test_lamp2n_sample_keeps_category_field():
    users = list(read_lamp_questions(shared("samples", "lamp2n_train_questions.json"), get_task("LaMP-2N")))
    assert all(item.fields.get("category") for u in users for item in u.items)
    golds = read_lamp_outputs(shared("samples", "lamp2n_train_outputs.json"), get_task("LaMP-2N"))
    assert golds["101"] == "style & beauty"


def test_lamp7_validates_all_users_and_ingests_a_slice(tmp_path, store_path, encoder):
    questions = shared("lamp7", "questions.json")
    task = get_task("LaMP-7")
    golds = read_lamp_outputs(shared("lamp7", "outputs.json"), task)
    users = list(read_lamp_questions(questions, task, golds))
    assert len(users) == 1000 and sum(len(u.items) for u in users) == 17726
    assert all(u.queries[0].output for u in users)
    raw = json.loads(questions.read_text())[:25]
    part = tmp_path / "questions.json"
    part.write_text(json.dumps(raw))
    summary = ingest(Store(store_path), lamp_source(part, task, None, "dev"), encoder)
    assert summary["users"] == 25 and summary["items"] == sum(len(q["profile"]) for q in raw)


def test_questions_sharing_a_user_merge_their_profiles(tmp_path, store_path, encoder):
    questions = [
        {"id": "q1", "user_id": "u", "input": "a", "profile": [{"id": "1", "text": "one"}, {"id": "2", "text": "two"}]},
        {"id": "q2", "user_id": "u", "input": "b", "profile": [{"id": "1", "text": "one"}, {"id": "3", "text": "three"}]},
    ]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(questions))
    store = Store(store_path)
    ingest(store, lamp_source(path, get_task("LaMP-7")), encoder)
    user = store.get_user("u")
    assert (user.n_items, user.n_queries) == (3, 2)


def test_another_encoder_on_the_same_store_is_an_error(store_path, encoder, few_users):
    store = Store(store_path)
    ingest(store, users_jsonl_source(few_users, get_task("LaMP-7")), encoder)
    impostor = replace(encoder, id="some/other-encoder")
    with pytest.raises(StoreError, match="all-MiniLM-L6-v2"):
        ingest(store, users_jsonl_source(few_users, get_task("LaMP-7")), impostor)


def test_users_jsonl_reader_keeps_extra_fields_and_parses_time(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(
        '{"user_id": 7, "team": "red", "history": [{"id": 1, "text": "hi", "timestamp": "2024-05-01T10:00:00Z", "lang": "en"}]}\n\n'
    )
    [user] = list(read_users_jsonl(path, get_task("custom")))
    assert user.user_id == "7" and user.metadata == {"team": "red"}
    assert user.items[0].item_id == "1" and user.items[0].fields == {"text": "hi", "lang": "en"}
    assert user.items[0].timestamp.isoformat() == "2024-05-01T10:00:00"
