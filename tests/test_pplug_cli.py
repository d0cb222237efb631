"""PPlug through the CLI with the embedded SmolLM2 on the example users (planted styles): the trained
embedder makes the frozen LLM write in each test user's style far more often than the same
training without a personal token, serves users it never saw, mixes users in a batch, explains
itself, and bad requests change nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import EXAMPLES, ROOT, cli_fails, cli_json
from persona_cli.main import app
from store import Store

sys.path.insert(0, str(ROOT / "examples"))
from make_users import STYLES as STYLE_RULES, shows_style  # noqa: E402

runner = CliRunner()
pytestmark = pytest.mark.slow
USERS = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
STYLES = {u["user_id"]: u["style"] for u in USERS}
PROMPT = "Paraphrase the following tweet without any explanation before or after it: "
# float32 so the figures hold on every CPU (bf16 autocast is only where the CPU has it); history items
# with an input are examples too; over the task LoRA as the paper stacks it (the LLM then paraphrases
# already, and the embedder only has to learn the style): 80 steps at lr 6e-3. On the bare LLM it took
# 150 steps (0.333 vs 0.000), and 100 steps at lr 5e-3 showed no style at all
TASK_LORA = ["--steps", "16", "--eval-every", "8", "--precision", "float32"]
TRAINING = ["--base", "task-lora-LaMP-7", "--history-examples", "--steps", "80", "--batch-size", "8", "--lr", "6e-3",
            "--eval-every", "40", "--max-length", "128", "--precision", "float32"]  # fmt: skip
# measured in float32 (two threads, the demo's runs): agreement 0.231 with this 16-step task LoRA and 0.385
# with a 20-step one, its --ablation (another user's history) 0.000 both times; the suite passes on one thread
STYLE_FLOOR, MARGIN = 0.20, 0.15


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pplug") / "store"
    assert runner.invoke(app, ["--store", str(path), "ingest", str(EXAMPLES), "--task", "LaMP-7"]).exit_code == 0
    cli_json(path, "adapt", "--task", "LaMP-7", *TASK_LORA)
    return path


@pytest.fixture(scope="module")
def trained(store) -> dict:
    return cli_json(store, "train-embedder", "--task", "LaMP-7", *TRAINING)


@pytest.fixture(scope="module")
def no_personal(store, trained) -> dict:
    """An embedder without the personal token (the instruction token only), trained briefly."""
    return cli_json(store, "train-embedder", "--task", "LaMP-7", "--name", "pplug-none", "--no-personal", "--steps", "2", "--eval-every", "2")


def _tables(store: Path) -> dict[str, tuple[int, int]]:
    return {t["table"]: (t["rows"], t["version"]) for t in Store(store).info()["tables"]}


def _agreement(store: Path, run_id: str) -> tuple[float, list[str]]:
    """Share of test answers that carry their user's planted style (answers a style cannot show are left out)."""
    opened = Store(store)
    inputs = {q.query_id: q.input for q in opened.task_queries("LaMP-7")}
    verdicts = []
    for p in opened.run_predictions(run_id):
        verdict = shows_style(STYLES[p.user_id], p.output, inputs[p.query_id].removeprefix(PROMPT))
        if verdict is not None:
            verdicts.append((verdict, f"{STYLES[p.user_id]}: {p.output}"))
    return sum(v for v, _ in verdicts) / len(verdicts), [line for _, line in verdicts]


def test_train_embedder_stores_a_pplug_plugin_with_its_ids_and_curve(store, trained):
    assert trained["name"] == "pplug-LaMP-7" and trained["kind"] == "pplug" and trained["base"] == "task-lora-LaMP-7"
    assert trained["encoder"] == "all-MiniLM-L6-v2" and trained["llm"] == "SmolLM2-135M-Instruct"
    assert trained["pooling"] == "attention" and trained["personal"] and trained["llm_dim"] == 576
    assert trained["train_examples"] > 96  # 96 training-split queries plus the history items with an input
    assert trained["steps"] == 80 and trained["best_dev_loss"] > 0
    curve = cli_json(store, "plugins", "show", "pplug-LaMP-7")["curve"]
    dev = {p["step"]: p["dev_loss"] for p in curve if "dev_loss" in p}
    assert sorted(dev) == [40, 80] and trained["best_step"] == min(dev, key=dev.get) and trained["best_dev_loss"] == min(dev.values())
    listed = {p["name"]: p for p in cli_json(store, "plugins", "list")["plugins"]}
    assert listed["pplug-LaMP-7"]["kind"] == "pplug"


def test_personal_tokens_carry_each_users_style(store, trained):
    """The 13 test users were never trained on; their answers follow their own planted style far more
    often with their own soft token than with the same embedder fed another user's history (--ablation)."""
    personal = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "pplug")
    ablation = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "pplug", "--ablation")
    assert personal["n_examples"] == ablation["n_examples"] == 39
    assert ablation["method"] == "pplug-ablation" and ablation["config"]["ablation"].startswith("another user's history")
    ours, examples = _agreement(store, personal["run_id"])
    theirs, _ = _agreement(store, ablation["run_id"])
    print(f"style agreement: pplug {ours:.3f}, --ablation {theirs:.3f}\n" + "\n".join(examples))
    assert ours >= STYLE_FLOOR and ours >= theirs + MARGIN


def test_the_ablation_serves_each_user_with_another_users_history(store, trained):
    """A seeded derangement: nobody keeps their own history, every history is used once, same seed same map."""
    from recipes.kit.retrieval import donors

    users = [str(u) for u in range(13)]
    mapping = donors(users, seed=0, method="pplug")
    assert sorted(mapping) == sorted(mapping.values()) == sorted(users)
    assert all(mapping[u] != u for u in users) and donors(users, seed=0, method="pplug") == mapping != donors(users, seed=1, method="pplug")
    (store.parent / "users.txt").write_text("2\n4\n")
    swapped = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "pplug", "--ablation", "--users", str(store.parent / "users.txt"))
    opened = Store(store)
    by_user = {p.query_id: p.raw for p in opened.run_predictions(swapped["run_id"])}
    for prediction in opened.run_predictions(swapped["run_id"])[:1]:  # user 2 answered with user 4's history
        query = next(q for q in opened.user_queries(prediction.user_id) if q.query_id == prediction.query_id)
        own = cli_json(store, "generate", "--user", prediction.user_id, "--method", "pplug", query.input)
        assert by_user[query.query_id] != own["raw"]


def test_a_user_ingested_after_training_is_served_with_no_training(store, trained, tmp_path, llm):
    """Two newcomers write the same sentences, one with a signature hashtag, one plainly: served at
    once, with nothing trained, each with personal tokens made from their own history."""
    rule = STYLE_RULES["hashtag"]
    sentences = [h["input"] for h in USERS[2]["history"]]
    users = [{"user_id": name, "history": [{"id": f"n{i}", "text": write(s), "input": s} for i, s in enumerate(sentences)]}
             for name, write in (("newcomer", rule), ("plain-newcomer", lambda s: s))]  # fmt: skip
    (tmp_path / "new.jsonl").write_text("\n".join(json.dumps(u) for u in users) + "\n")
    plugins_before = _tables(store)["plugins"]
    assert runner.invoke(app, ["--store", str(store), "ingest", str(tmp_path / "new.jsonl"), "--task", "LaMP-7"]).exit_code == 0
    answers = {u["user_id"]: cli_json(store, "generate", "--user", u["user_id"], "--method", "pplug", PROMPT + "The museum opens early on Sundays.")
               for u in users}  # fmt: skip
    assert answers["newcomer"]["method"] == "pplug" and answers["newcomer"]["output"]
    assert _tables(store)["plugins"] == plugins_before  # nothing was trained or stored for the newcomers
    # their personal tokens come from their own stored histories: same input, different histories,
    # different tokens; the instruction token (the first) is everyone's
    from recipes.methods.pplug.serving import query_soft_tokens
    from recipes.methods.pplug.training import history_vectors
    from recipes.kit.tasks import get_task
    from store import Query

    opened, lamp7 = Store(store), get_task("LaMP-7")
    queries = [Query("q", u["user_id"], "LaMP-7", PROMPT + "The museum opens early on Sundays.") for u in users]
    vectors = history_vectors(opened, lamp7, [u["user_id"] for u in users], 50)
    tokens = query_soft_tokens(opened.get_plugin("pplug-LaMP-7"), llm, lamp7, queries, vectors).vectors
    assert torch.equal(tokens[0, 0], tokens[1, 0]) and not torch.allclose(tokens[0, 1:], tokens[1, 1:], atol=1e-3)
    explained = cli_json(store, "explain", "--user", "newcomer", PROMPT + "The museum opens early on Sundays.")
    assert explained["history_items"] == len(sentences) and all(i["item_id"].startswith("n") for i in explained["items"])


def test_mixed_user_batches_answer_like_one_user_at_a_time(store, trained):
    (store.parent / "users.txt").write_text("2\n4\n8\n")
    run = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "pplug", "--users", str(store.parent / "users.txt"))
    assert run["config"]["pplug"] == "pplug-LaMP-7" and run["config"]["users"] == 3
    opened = Store(store)
    for prediction in opened.run_predictions(run["run_id"])[::4]:
        query = next(q for q in opened.user_queries(prediction.user_id) if q.query_id == prediction.query_id)
        alone = cli_json(store, "generate", "--user", prediction.user_id, "--method", "pplug", query.input)
        assert alone["raw"] == prediction.raw


def test_explain_names_the_users_items_with_the_largest_weights(store, trained):
    explained = cli_json(store, "explain", "--user", "42", "--top", "4", PROMPT + "The flavor of this coffee reminds me of chocolate.")
    items = explained["items"]
    weights = [i["weight"] for i in items]
    assert len(items) == 4 and weights == sorted(weights, reverse=True) and all(0 < w < 1 for w in weights)
    assert all(i["item_id"].startswith("u42-") for i in items)
    assert explained["history_items"] == len(USERS[42]["history"]) and explained["pooling"] == "attention"
    assert weights[0] >= explained["uniform_weight"]
    result = runner.invoke(app, ["--store", str(store), "explain", "--user", "42", PROMPT + "Coffee."])
    assert result.exit_code == 0 and "what pplug-LaMP-7 attends to" in result.output


def test_pplug_with_rag_and_a_mean_pooling_embedder(store, trained):
    users = store.parent / "users.txt"
    users.write_text("2\n")
    rag = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "pplug+rag", "--k", "1", "--users", str(users))
    assert rag["method"] == "pplug+rag-bm25-k1" and rag["n_examples"] == 3
    mean = cli_json(store, "train-embedder", "--task", "LaMP-7", "--name", "pplug-mean", "--pooling", "mean", "--steps", "2", "--eval-every", "2")
    assert mean["pooling"] == "mean" and mean["weights_bytes"] < 5_000_000  # no input encoder to store
    run = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "pplug", "--plugin", "pplug-mean", "--users", str(users))
    assert run["method"] == "pplug[pplug-mean]" and run["config"]["pooling"] == "mean"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train-embedder", "--task", "LaMP-7", "--pooling", "max"], "--pooling max"),
        (["train-embedder", "--task", "LaMP-7"], "exists; pass --replace"),
        (["train-embedder", "--task", "LaMP-7", "--name", "x", "--base", "nosuch"], "no plug-in 'nosuch'"),
        (["train-embedder", "--task", "LaMP-7", "--name", "x", "--steps", "0"], "--steps"),
        (["generate", "--user", "42", "--method", "pplug", "--plugin", "nosuch", PROMPT + "Hi."], "no plug-in 'nosuch'"),
        (["generate", "--user", "42", "--method", "pplug+magic", PROMPT + "Hi."], "--method pplug+magic"),
        (["evaluate", "--task", "LaMP-7", "--method", "pplug", "--pool", "pool-1"], "--pool goes with"),
        (["explain", "--user", "42", "--plugin", "pplug-none", PROMPT + "Hi."], "without a personal token"),
        (["evaluate", "--task", "LaMP-7", "--method", "pplug", "--plugin", "pplug-none", "--ablation"], "an ablation already"),
        (["evaluate", "--task", "LaMP-7", "--method", "pplug", "--ablation", "--limit", "1"], "needs at least 2 users"),
        (["explain", "--user", "nobody", PROMPT + "Hi."], "no user 'nobody'"),
        (["explain", "--user", "42", "--top", "0", PROMPT + "Hi."], "--top"),
        (["explain", "--user", "42", " "], "empty"),
    ],
)
def test_bad_requests_fail_in_one_line_and_change_nothing(store, trained, no_personal, args, message):
    before = _tables(store)
    assert message in cli_fails(store, *args)
    assert _tables(store) == before
