"""The CLI as a user drives it: ingest, store, users, search, generate, with --json and errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import EXAMPLES
from persona_cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "store"
    result = runner.invoke(app, ["--store", str(path), "ingest", str(EXAMPLES), "--task", "LaMP-7", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["users"], summary["items"], summary["queries"]) == (48, 1259, 144)
    assert summary["encoder"] == "all-MiniLM-L6-v2" and summary["seconds"] > 0
    return path


def _json(store, *args):
    result = runner.invoke(app, ["--store", str(store), *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_store_info_and_optimize(demo_store):
    info = _json(demo_store, "store", "info")
    assert {t["table"]: t["rows"] for t in info["tables"]} == {"behaviors": 1259, "queries": 144, "users": 48}
    assert info["disk_bytes"] > 0 and info["encoder_dim"] == 384
    optimized = _json(demo_store, "store", "optimize")
    assert optimized["disk_bytes_after"] > 0


def test_users_list_and_show(demo_store):
    listing = _json(demo_store, "users", "list", "--limit", "5")
    assert listing["total"] == 48 and [u["user_id"] for u in listing["users"]] == ["0", "1", "2", "3", "4"]
    shown = _json(demo_store, "users", "show", "4")
    assert shown["user"]["metadata"] == {"style": "british"}
    assert len(shown["history"]) == shown["user"]["n_items"] and len(shown["queries"]) == 3
    table = runner.invoke(app, ["--store", str(demo_store), "users", "show", "4", "--items", "3"])
    assert table.exit_code == 0 and "history (latest 3 of" in table.output


def test_search_finds_the_users_own_nearest_items(demo_store):
    shown = _json(demo_store, "users", "show", "4")
    target = shown["history"][5]["text"]
    hits = _json(demo_store, "search", "--user", "4", target, "--k", "3")
    own_ids = {item["item_id"] for item in shown["history"]}
    assert len(hits) == 3 and {h["item_id"] for h in hits} <= own_ids
    assert hits[0]["text"] == target and hits[0]["score"] > 0.99
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_store_from_environment_variable(demo_store, monkeypatch):
    monkeypatch.setenv("PERSONA_STORE", str(demo_store))
    result = runner.invoke(app, ["users", "list", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["total"] == 48


def test_generate_with_the_embedded_llm(demo_store):
    prompt = "Paraphrase the following tweet without any explanation before or after it: I love my new bike."
    out = _json(demo_store, "generate", "--user", "4", prompt, "--max-new-tokens", "24")
    assert out["llm"] == "SmolLM2-135M-Instruct" and out["method"] == "none" and out["output"].strip()
    assert out["task"] == "LaMP-7" and out["prompt"] == prompt


def test_generate_with_rag_puts_the_users_own_items_in_the_prompt(demo_store):
    history = {item["text"] for item in _json(demo_store, "users", "show", "4", "--items", "0")["history"]}
    prompt = "Paraphrase the following tweet without any explanation before or after it: I love my new bike."
    out = _json(demo_store, "generate", "--user", "4", "--method", "rag", "--k", "2", prompt, "--max-new-tokens", "8")
    quoted = [line.strip('"') for line in out["prompt"].splitlines()[1:3]]
    assert out["prompt"].startswith("Tweets this user has written:") and out["prompt"].endswith(prompt)
    assert all(q in history for q in quoted)


@pytest.mark.parametrize(
    "args,message",
    [
        (["users", "show", "nobody"], "no user 'nobody'"),
        (["search", "--user", "nobody", "x"], "no user 'nobody'"),
        (["generate", "--user", "nobody", "x"], "no user 'nobody'"),
        (["generate", "--user", "4", "--method", "gpt5", "x"], "--method gpt5: expected one of none, random, rag, pag"),
        (["generate", "--user", "4", "--method", "pplug", "x"], "no plug-in 'pplug-LaMP-7'"),
        (["generate", "--user", "4", "--method", "rag", "--k", "0", "x"], "--k must be at least 1"),
        (["generate", "--user", "4", "--answer", "rank", "x"], "--answer rank needs a task with a label set"),
        (["ingest", str(EXAMPLES), "--split", "holdout"], "--split must be train, dev or test"),
        (["ingest", "--format", "lamp", str(EXAMPLES)], "--format lamp needs --task"),
        (["ingest", str(EXAMPLES), "--task", "LaMP-9"], "unknown LaMP task 'LaMP-9'"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(demo_store, args, message):
    result = runner.invoke(app, ["--store", str(demo_store), *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output


def test_search_on_an_empty_store_says_what_to_do(tmp_path):
    result = runner.invoke(app, ["--store", str(tmp_path / "empty"), "search", "--user", "1", "x"])
    assert result.exit_code == 2 and "run persona ingest first" in result.output


def test_the_in_process_runner_returns_a_commands_json_or_its_exit_code(demo_store, capsys):
    from persona_cli.inprocess import run_persona

    listing = run_persona(demo_store, "users", "list", "--limit", "2", quiet=True)
    assert [u["user_id"] for u in listing["users"]] == ["0", "1"]
    assert capsys.readouterr().out.startswith("$ persona users list --limit 2")  # the command line, not its JSON
    assert run_persona(demo_store, "users", "show", "nobody", quiet=True, echo=False) == {"exit_code": 2}
    printed = capsys.readouterr()
    assert "no user 'nobody'" in printed.err + printed.out


def _imported_in_a_fresh_process(store, commands: list[list[str]]) -> list[str]:
    """Which heavy libraries a fresh Python has imported after running these commands in it."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "lancedb", "peft", "sentence_transformers")
    probe = (
        "import json, sys\nfrom typer.testing import CliRunner\nfrom persona_cli.main import app\n"
        f"for args in {commands!r}:\n"
        f"    result = CliRunner().invoke(app, ['--store', {str(store)!r}, *args])\n"
        "    assert result.exit_code in (0, 2), (args, result.output)\n"
        f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))\n"
    )  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_help_wrong_options_and_browsing_start_without_the_models_libraries(demo_store):
    """Help and a mistyped option answer before torch, transformers or LanceDB are imported
    (seconds of start-up), and the commands that browse the store import LanceDB only: the
    commands import the rest when they need it."""
    asking = [["--help"], ["generate", "--help"], ["evaluate", "--help"], ["pairs", "show", "--help"], ["evaluate", "--bogus"]]
    assert _imported_in_a_fresh_process(demo_store, asking) == []
    browsing = [["users", "list"], ["users", "show", "0"], ["runs", "list"], ["store", "info"], ["plugins", "list"]]
    assert _imported_in_a_fresh_process(demo_store, browsing) == ["lancedb"]


def test_the_written_out_help_is_what_the_registry_makes():
    """--method, --ablation and --recipe help are written out so that help needs no library; they
    must still say what the method registry and the pair recipes say."""
    from persona_cli.options import ABLATION_HELP, METHOD_HELP
    from persona_cli.pairs_cmd import RECIPE_HELP
    from recipes.kit.history_pairs import PAIR_RECIPES
    from recipes.methods.registry import ablation_help, method_help

    assert METHOD_HELP == method_help(), f"persona_cli/options.py METHOD_HELP is out of date; the registry makes:\n{method_help()}"
    assert ABLATION_HELP == ablation_help(), f"persona_cli/options.py ABLATION_HELP is out of date; the registry makes:\n{ablation_help()}"
    recipes = ", ".join(r for r in PAIR_RECIPES if r != "none")
    assert RECIPE_HELP == f"How pairs are made: {recipes}.", f"persona_cli/pairs_cmd.py RECIPE_HELP should name: {recipes}"
