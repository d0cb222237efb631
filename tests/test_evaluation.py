"""Evaluation end to end through the CLI with the embedded SmolLM2: runs are stored, listed, shown,
compared on shared queries, exported in LaMP's format, and scoring a file agrees with
rouge-score and scikit-learn called directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score
from typer.testing import CliRunner

from conftest import EXAMPLES, cli_fails, cli_json, shared
from persona_cli.main import app
from recipes.kit.metrics import per_example_cased_rouge1
from recipes.kit.splits import user_split
from recipes.kit.tasks import NEWS_CATEGORIES
from store import Store

runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "store"
    result = runner.invoke(app, ["--store", str(path), "ingest", str(EXAMPLES), "--task", "LaMP-7"])
    assert result.exit_code == 0, result.output
    return path


_cli, _fail = cli_json, cli_fails


@pytest.fixture(scope="module")
def runs(store) -> dict:
    """Four runs on the first 4 test queries of the example users."""
    common = ["evaluate", "--task", "LaMP-7", "--limit", "4", "--max-new-tokens", "24"]
    return {
        "none": _cli(store, *common, "--method", "none"),
        "rag": _cli(store, *common, "--method", "rag", "--k", "2"),
        "pag": _cli(store, *common, "--method", "pag"),
        "exact": _cli(store, *common, "--method", "none", "--scoring", "exact"),
    }


def test_a_run_is_stored_with_metrics_timing_and_predictions(store, runs):
    none = runs["none"]
    assert none["run_id"] == "1" and none["task"] == "LaMP-7" and none["split"] == "test" and none["n_examples"] == 4
    assert set(none["metrics"]) == {"rouge-1", "rouge-L", "rouge-1-cased", "rouge-1-exact", "rouge-L-exact"}
    assert 0 <= none["metrics"]["rouge-L"] <= none["metrics"]["rouge-1"] <= 1 and none["config"]["scoring"] == "cleaned"
    assert none["wall_s"] > 0 and none["examples_per_s"] > 0 and none["config"]["answer"] == "generate"
    shown = _cli(store, "runs", "show", "1", "--examples", "10")
    assert len(shown["predictions"]) == 4
    assert all(user_split(p["user_id"]) == "test" and p["gold"] for p in shown["predictions"])
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    direct = sum(scorer.score(p["gold"], p["output"])["rouge1"].fmeasure for p in shown["predictions"]) / 4
    assert none["metrics"]["rouge-1"] == pytest.approx(direct)
    # beside LaMP's ROUGE, the cased ROUGE-1 of the same answers (case and punctuation counted)
    cased = per_example_cased_rouge1([p["output"] for p in shown["predictions"]], [p["gold"] for p in shown["predictions"]])
    assert none["metrics"]["rouge-1-cased"] == pytest.approx(sum(cased) / 4)
    # LaMP's own scoring: the answers as generated; a cleaned run reports it beside its own
    exact = runs["exact"]
    assert exact["method"] == "none@exact" and exact["config"]["scoring"] == "exact" and set(exact["metrics"]) == {"rouge-1", "rouge-L", "rouge-1-cased"}
    assert exact["metrics"]["rouge-1"] == pytest.approx(none["metrics"]["rouge-1-exact"])
    assert all(p["output"] == p["raw"].strip() for p in _cli(store, "runs", "show", exact["run_id"], "--examples", "10")["predictions"])


def test_runs_list_and_compare_on_shared_queries(store, runs):
    listed = _cli(store, "runs", "list")["runs"]
    assert [r["method"] for r in listed] == ["none", "rag-bm25-k2", "pag", "none@exact"]
    more = _cli(store, "evaluate", "--task", "LaMP-7", "--limit", "2", "--max-new-tokens", "24")
    compared = _cli(store, "runs", "compare", runs["none"]["run_id"], runs["rag"]["run_id"], more["run_id"])
    assert compared["shared_queries"] == 2 and [r["run_id"] for r in compared["runs"]] == ["1", "2", more["run_id"]]
    assert compared["metric_names"] == ["rouge-1", "rouge-L", "rouge-1-cased"]
    # the same greedy method on the same two queries scores the same
    assert compared["runs"][0]["metrics"] == compared["runs"][2]["metrics"]
    table = runner.invoke(app, ["--store", str(store), "runs", "compare", "1", "2"])
    assert table.exit_code == 0 and "4 shared queries" in table.output


def test_pag_profiles_are_cached_in_the_store_and_reused(store, runs):
    assert runs["pag"]["config"]["profiles_written"] == 2  # 4 queries of 2 users
    again = _cli(store, "evaluate", "--task", "LaMP-7", "--limit", "4", "--method", "pag", "--max-new-tokens", "4")
    assert again["config"]["profiles_written"] == 0
    user = _cli(store, "runs", "show", runs["pag"]["run_id"])["predictions"][0]["user_id"]
    assert _cli(store, "users", "show", user)["user"]["profile"]


def test_exported_predictions_score_the_same_as_the_run(store, runs, tmp_path):
    exported = tmp_path / "preds.json"
    run = _cli(store, "evaluate", "--task", "LaMP-7", "--limit", "4", "--method", "rag", "--k", "2",
               "--max-new-tokens", "24", "--export", str(exported))  # fmt: skip
    data = json.loads(exported.read_text())
    assert data["task"] == "LaMP_7" and len(data["golds"]) == 4
    assert run["metrics"] == runs["rag"]["metrics"]  # greedy, same prompts: a run repeats exactly
    shown = _cli(store, "runs", "show", run["run_id"], "--examples", "10")
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"task": "LaMP_7", "golds": [{"id": p["query_id"], "output": p["gold"]} for p in shown["predictions"]]}))
    scored = _cli(store, "evaluate", "--task", "LaMP-7", "--predictions", str(exported), "--outputs", str(outputs))
    assert scored["n_examples"] == 4 and scored["metrics"] == pytest.approx({k: v for k, v in run["metrics"].items() if not k.endswith("-exact")})


def test_rag_min_similarity_shows_only_items_alike_to_the_input(store, runs):
    """No item passes a threshold of 1: the k=0 prompt and k=0's answers; every item passes -1: plain rag's."""
    common = ["evaluate", "--task", "LaMP-7", "--limit", "4", "--max-new-tokens", "24", "--method", "rag", "--k", "2"]
    strict, loose = _cli(store, *common, "--min-similarity", "1"), _cli(store, *common, "--min-similarity", "-1")
    assert strict["method"] == "rag-bm25-k2-sim1" and strict["config"]["min_similarity"] == 1.0
    answers = lambda run: [p["output"] for p in _cli(store, "runs", "show", run["run_id"], "--examples", "10")["predictions"]]  # noqa: E731
    assert answers(strict) == answers(runs["none"]) and answers(loose) == answers(runs["rag"])
    assert answers(runs["none"]) != answers(runs["rag"])  # so the two checks above tell the prompts apart


def test_random_history_is_repeatable_by_seed(store):
    args = ["evaluate", "--task", "LaMP-7", "--limit", "3", "--method", "random", "--k", "2", "--max-new-tokens", "12"]
    first, second = _cli(store, *args), _cli(store, *args)
    assert first["metrics"] == second["metrics"]


def test_the_rag_ablation_retrieves_from_another_users_history(store):
    args = ["evaluate", "--task", "LaMP-7", "--limit", "8", "--method", "rag", "--k", "1", "--max-new-tokens", "8"]
    own, swapped = _cli(store, *args), _cli(store, *args, "--ablation")
    assert own["method"] == "rag-bm25-k1" and swapped["method"] == "rag-bm25-k1-ablation"
    assert "another user's history" in swapped["config"]["ablation"] and own["config"]["ablation"] is False


@pytest.mark.parametrize(
    "args,message",
    [
        (["evaluate", "--task", "LaMP-7", "--method", "magic"], "--method magic: expected one of"),
        (["evaluate", "--task", "LaMP-7", "--answer", "rank"], "--answer rank needs a task with a label set"),
        (["evaluate", "--task", "LaMP-7", "--split", "holdout"], "--split holdout: expected one of"),
        (["evaluate", "--task", "LaMP-2N"], "has no LaMP-2N queries with gold outputs"),
        (["evaluate", "--task", "LaMP-7", "--retriever", "tfidf", "--method", "rag"], "--retriever tfidf"),
        (["evaluate", "--task", "LaMP-7", "--method", "none", "--ablation"], "--ablation goes with a personal method (random, rag, "),
        (["evaluate", "--task", "LaMP-7", "--predictions", "p.json"], "needs both --predictions and --outputs"),
        (["runs", "show", "999"], "no run '999'"),
        (["runs", "compare", "1"], "compare needs at least two run ids"),
    ],
)
def test_evaluation_errors_are_one_line_and_write_nothing(store, runs, args, message):
    before = Store(store).info()["tables"]
    assert message in _fail(store, *args)
    assert Store(store).info()["tables"] == before


def test_users_file_selects_users_and_names_unknown_ones(store, runs, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("# two test users\n2\n4\n")
    run = _cli(store, "evaluate", "--task", "LaMP-7", "--users", str(users), "--max-new-tokens", "4")
    assert run["n_examples"] == 6 and run["config"]["users"] == 2
    users.write_text("2\nnobody\n")
    assert "user 'nobody' has no LaMP-7 queries" in _fail(store, "evaluate", "--task", "LaMP-7", "--users", str(users))


def test_a_predictions_file_missing_answers_is_refused(store, tmp_path):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"task": "LaMP_7", "golds": [{"id": "1", "output": "a"}, {"id": "2", "output": "b"}]}))
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"task": "LaMP_7", "golds": [{"id": "1", "output": "a"}]}))
    message = _fail(store, "evaluate", "--task", "LaMP-7", "--predictions", str(preds), "--outputs", str(outputs))
    assert "1 of 2 gold ids have no prediction, e.g. '2'" in message
    preds.write_text('{"task": "LaMP_7", "golds": [')
    assert "preds.json: line 1: not valid JSON" in _fail(store, "evaluate", "--task", "LaMP-7", "--predictions", str(preds), "--outputs", str(outputs))


# ---------- scoring external LaMP files against the libraries called directly ----------


def test_scoring_lamp7_copy_the_input_agrees_with_rouge_score(tmp_path):
    questions = json.loads(shared("lamp7", "questions.json").read_text())
    outputs_path = shared("lamp7", "outputs.json")
    golds = {g["id"]: g["output"] for g in json.loads(outputs_path.read_text())["golds"]}
    marker = "before or after it:"
    copied = {q["id"]: q["input"].split(marker, 1)[1].strip() for q in questions}
    preds = tmp_path / "copy.json"
    preds.write_text(json.dumps({"task": "LaMP_7", "golds": [{"id": i, "output": o} for i, o in copied.items()]}))
    result = runner.invoke(app, ["evaluate", "--task", "LaMP-7", "--predictions", str(preds), "--outputs", str(outputs_path), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    direct = [scorer.score(golds[i], copied[i]) for i in golds]
    assert scored["n_examples"] == len(golds) == 1000
    assert scored["metrics"]["rouge-1"] == pytest.approx(sum(s["rouge1"].fmeasure for s in direct) / 1000)
    assert scored["metrics"]["rouge-L"] == pytest.approx(sum(s["rougeL"].fmeasure for s in direct) / 1000)
    assert 0.4 < scored["metrics"]["rouge-L"] < scored["metrics"]["rouge-1"] < 0.55  # the copy floor DESIGN.md quotes


def test_scoring_lamp2n_agrees_with_scikit_learn(tmp_path):
    outputs_path = shared("lamp2n", "outputs.json")
    golds = {g["id"]: g["output"] for g in json.loads(outputs_path.read_text())["golds"]}
    labels = list(NEWS_CATEGORIES)
    # a deterministic, partly right, partly invalid system: every third answer is off the label set
    answers = {}
    for n, (qid, gold) in enumerate(sorted(golds.items())):
        answers[qid] = gold if n % 3 == 0 else ("not a category" if n % 3 == 1 else labels[(labels.index(gold) + 1) % 15])
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"task": "LaMP_2N", "golds": [{"id": i, "output": o} for i, o in answers.items()]}))
    result = runner.invoke(app, ["evaluate", "--task", "LaMP-2N", "--predictions", str(preds), "--outputs", str(outputs_path), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)["metrics"]
    ids = list(golds)
    y_true = [labels.index(golds[i]) for i in ids]
    y_pred = [labels.index(answers[i]) if answers[i] in labels else -1 for i in ids]
    assert scored["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert scored["f1"] == pytest.approx(f1_score(y_true, y_pred, labels=list(range(15)), average="macro", zero_division=0))


def test_a_gold_outside_the_label_set_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """Found when the queries are selected, as one line naming the query, not as a traceback
    from scoring after all the answers were generated."""
    user = {"user_id": "u1", "history": [{"id": "h1", "text": "An article about football.", "category": "sports"}],
            "queries": [{"id": "q1", "input": "Which category does this article relate to? Article: Stocks fell.", "output": "not a category"}]}  # fmt: skip
    (tmp_path / "u.jsonl").write_text(json.dumps(user) + "\n")
    store = tmp_path / "store"
    assert runner.invoke(app, ["--store", str(store), "ingest", str(tmp_path / "u.jsonl"), "--task", "LaMP-2N", "--split", "test"]).exit_code == 0

    def no_model(*_, **__):
        raise AssertionError("the LLM was loaded before the golds were checked")

    monkeypatch.setattr("recipes.kit.backbones.load_llm", no_model)
    assert "query q1: gold 'not a category' is not one of the labels" in _fail(store, "evaluate", "--task", "LaMP-2N")
    assert Store(store).list_runs() == []
