"""Bad input: one line naming file, place and field, exit code 2, and the store exactly as it was."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from persona_cli.main import app
from store import Store

GOOD = {"user_id": "1", "history": [{"id": "a", "text": "hello there"}], "queries": [{"id": "q", "input": "x", "output": "y"}]}


def _line(**changes) -> str:
    record = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        record[key] = value
    return json.dumps(record)


PREFIX = json.dumps({"user_id": "0", "history": [{"id": "z", "text": "a valid first user"}]})
"""Every bad file starts with this valid user on line 1: it must not be written either."""

JSONL_CASES = [
    ("not JSON", "{user_id: 1", "line 2", None, "not valid JSON"),
    ("missing user_id", json.dumps({"history": []}), "line 2", "user_id", "is missing"),
    ("wrong type id", _line(user_id=[1]), "line 2", "user_id", "must be a string or integer"),
    ("history not a list", _line(history="text"), "line 2", "history", "must be a list"),
    ("empty text", _line(history=[{"id": "a", "text": "   "}]), "line 2", "history[0].text", "is empty"),
    ("missing text", _line(history=[{"id": "a"}]), "line 2", "history[0].text", "is missing"),
    ("wrong-typed text", _line(history=[{"id": "a", "text": 5}]), "line 2", "history[0].text", "must be a string"),
    ("duplicate item id", _line(history=[{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]), "line 2", "history[1].id", "duplicate item id"),
    ("duplicate user", _line() + "\n" + _line(), "line 3", "user_id", "duplicate user '1' (first on line 2)"),
    ("duplicate query id", _line() + "\n" + _line(user_id="2"), "line 3", "queries[0].id", "duplicate query id 'q' (first on line 2)"),
    ("query without input", _line(queries=[{"id": "q"}]), "line 2", "queries[0].input", "is missing"),
    ("bad timestamp", _line(history=[{"id": "a", "text": "x", "timestamp": "yesterday"}]), "line 2", "history[0].timestamp", "not an ISO 8601"),
    ("not an object", "[1, 2]", "line 2", None, "must be an object"),
]


@pytest.fixture
def populated(store_path, few_users):
    """A store with three real users in it, and a way to see whether anything changed."""
    runner = CliRunner()
    result = runner.invoke(app, ["--store", str(store_path), "ingest", str(few_users), "--task", "LaMP-7", "--json"])
    assert result.exit_code == 0, result.output
    return runner


def _state(store_path) -> dict:
    info = Store(store_path).info()
    return {t["table"]: (t["rows"], t["version"]) for t in info["tables"]}


def _refused(runner, store_path, args, where, field, message, tmp_path_file):
    before = _state(store_path)
    result = runner.invoke(app, ["--store", str(store_path), *args])
    assert result.exit_code == 2, result.output
    error = result.output.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith("error: ") and str(tmp_path_file) in error and where in error and message in error
    if field:
        assert f"field '{field}'" in error
    assert _state(store_path) == before


@pytest.mark.parametrize("name,content,where,field,message", JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_bad_users_jsonl_is_refused(populated, store_path, tmp_path, name, content, where, field, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(PREFIX + "\n" + content + "\n")
    _refused(populated, store_path, ["ingest", str(path), "--task", "LaMP-7"], where, field, message, path)


def test_not_utf8_is_refused(populated, store_path, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_line().encode() + b"\n" + '{"user_id": "caf\xe9"}'.encode("latin-1") + b"\n")
    _refused(populated, store_path, ["ingest", str(path), "--task", "LaMP-7"], "line 2", None, "not UTF-8", path)


def test_missing_file_is_refused(populated, store_path, tmp_path):
    path = tmp_path / "nowhere.jsonl"
    _refused(populated, store_path, ["ingest", str(path)], "file", None, "does not exist", path)


def _lamp(tmp_path, questions, outputs=None):
    q = tmp_path / "questions.json"
    q.write_text(json.dumps(questions) if not isinstance(questions, str) else questions)
    args = ["ingest", "--format", "lamp", str(q), "--task", "LaMP-7"]
    o = None
    if outputs is not None:
        o = tmp_path / "outputs.json"
        o.write_text(json.dumps(outputs))
        args += ["--outputs", str(o)]
    return q, o, args


QUESTION = {"id": "10", "input": "Paraphrase: hi", "profile": [{"text": "a tweet"}]}


def test_lamp_outputs_for_unknown_ids_are_refused(populated, store_path, tmp_path):
    q, _, args = _lamp(tmp_path, [QUESTION], {"task": "LaMP_7", "golds": [{"id": "10", "output": "x"}, {"id": "99", "output": "y"}]})
    _refused(populated, store_path, args, "outputs", "id", "name no question here, e.g. '99'", q)


def test_lamp_outputs_of_another_task_are_refused(populated, store_path, tmp_path):
    _, o, args = _lamp(tmp_path, [QUESTION], {"task": "LaMP_5", "golds": [{"id": "10", "output": "x"}]})
    _refused(populated, store_path, args, "top level", "task", "--task is LaMP-7", o)


def test_lamp_question_without_profile_is_refused(populated, store_path, tmp_path):
    q, _, args = _lamp(tmp_path, [QUESTION, {"id": "11", "input": "x"}])
    _refused(populated, store_path, args, "item 1", "profile", "is missing", q)


def test_lamp_item_without_the_tasks_fields_is_refused(populated, store_path, tmp_path):
    q = tmp_path / "questions.json"
    q.write_text(json.dumps([{"id": "1", "input": "x", "profile": [{"id": "p", "title": "only a title"}]}]))
    args = ["ingest", "--format", "lamp", str(q), "--task", "LaMP-1"]
    _refused(populated, store_path, args, "item 0", "profile[0].abstract", "task LaMP-1 embeds title + abstract", q)


def test_broken_lamp_json_is_refused(populated, store_path, tmp_path):
    second = {**QUESTION, "id": "11"}
    q, _, args = _lamp(tmp_path, json.dumps([QUESTION, second])[:-5])
    _refused(populated, store_path, args, "item 1", None, "not valid JSON", q)


def test_duplicate_lamp_question_is_refused(populated, store_path, tmp_path):
    q, _, args = _lamp(tmp_path, [QUESTION, QUESTION])
    _refused(populated, store_path, args, "item 1", "id", "duplicate question id '10'", q)
