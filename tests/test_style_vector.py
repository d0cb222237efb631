"""StyleVector, the training-free steering method: each prompt of a mixed batch is steered by its
own user's vector, the vectors are cached per user in the store (a few KB), and the method runs
through generate and evaluate like every other, with its ablation and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli_fails, cli_json
from recipes.kit.decoding import GREEDY, Decoding
from recipes.kit.generation import generate, label_logprobs
from recipes.kit.row_edits import PerRow
from recipes.methods.style_vector import RowSteering, decoder_layers
from store import Store

PROMPTS = ["Paraphrase: the cat sat on the mat.", "Paraphrase: hello there", "Name a colour.", "Paraphrase: rain again today"]


@pytest.mark.parametrize("decoding", [GREEDY, Decoding(num_beams=3)], ids=["greedy", "beams"])
def test_each_prompt_is_steered_by_its_own_vector_in_a_mixed_batch(tiny_llama, decoding):
    path = decoder_layers(tiny_llama)[1]
    torch.manual_seed(1)
    vectors = torch.randn(len(PROMPTS), tiny_llama.model.config.hidden_size) * 4
    vectors[1] = 0  # a zero vector leaves its row as the bare model answers it
    alone = [
        generate(tiny_llama, [p], max_new_tokens=8, batch_size=1, decoding=decoding, per_row=PerRow(RowSteering(tiny_llama.model, path, vectors[i : i + 1])))[0]
        for i, p in enumerate(PROMPTS)
    ]  # fmt: skip
    together = generate(tiny_llama, PROMPTS, max_new_tokens=8, batch_size=3, decoding=decoding, per_row=PerRow(RowSteering(tiny_llama.model, path, vectors)))
    assert together == alone
    bare = generate(tiny_llama, PROMPTS, max_new_tokens=8, batch_size=3, decoding=decoding)
    assert together[1] == bare[1] and together != bare


def test_label_scores_follow_each_rows_vector(tiny_llama):
    path = decoder_layers(tiny_llama)[0]
    vectors = torch.randn(2, tiny_llama.model.config.hidden_size) * 4
    labels = ["yes", "no way"]
    together = label_logprobs(tiny_llama, PROMPTS[:2], labels, per_row=PerRow(RowSteering(tiny_llama.model, path, vectors)))
    for row in range(2):
        single = label_logprobs(tiny_llama, [PROMPTS[row]], labels, per_row=PerRow(RowSteering(tiny_llama.model, path, vectors[row : row + 1])))
        torch.testing.assert_close(together[row], single[0], atol=1e-4, rtol=1e-4)


QUERY = "Paraphrase the following tweet without any explanation before or after it: "


@pytest.fixture
def styled_store(tmp_path: Path, store_path: Path) -> Path:
    """Two LaMP-7 users with opposite styles, each with a query and its gold."""
    users = {
        "shouty": ["OMG THIS IS THE BEST DAY EVER!!!", "CANT WAIT FOR THE GAME TONIGHT!!!", "WHO ELSE IS TIRED?!"],
        "calm": ["a quiet walk by the river this morning.", "reading a good book with tea.", "the garden is lovely in june."],
    }
    rows = [
        {"user_id": u, "history": [{"id": f"{u}-{i}", "text": t} for i, t in enumerate(tweets)],
         "queries": [{"id": f"q-{u}", "input": QUERY + "The museum opens early on Sundays.", "output": tweets[0]}]}
        for u, tweets in users.items()
    ]  # fmt: skip
    path = tmp_path / "styled.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cli_json(store_path, "ingest", str(path), "--task", "LaMP-7")
    return store_path


def test_style_vector_runs_through_generate_and_evaluate_and_caches_its_vectors(styled_store, tiny_llm_dir):
    llm = ["--llm", str(tiny_llm_dir)]
    first = cli_json(styled_store, "generate", "--user", "shouty", "--method", "style-vector", "--set", "alpha=2", *llm, QUERY + "Nice day.")
    assert first["method"] == "style-vector" and isinstance(first["output"], str)
    stored = Store(styled_store).list_plugins(kind="style-vector")
    assert [p.name for p in stored] == ["style-vector-LaMP-7/shouty"] and stored[0].size < 8 * 1024  # a few KB a user
    run = cli_json(styled_store, "evaluate", "--task", "LaMP-7", "--method", "style-vector", "--split", "all", "--set", "alpha=2", *llm)
    assert run["method"] == "style-vector-alpha2" and run["n_examples"] == 2 and run["config"]["steered_users"] == 2
    cached = {p.name: p.created_at for p in Store(styled_store).list_plugins(kind="style-vector")}
    assert len(cached) == 2 and cached["style-vector-LaMP-7/shouty"] == stored[0].created_at  # reused, not made again
    ablation = cli_json(styled_store, "evaluate", "--task", "LaMP-7", "--method", "style-vector", "--split", "all", "--ablation", *llm)
    assert ablation["method"] == "style-vector-ablation" and "mean style vector" in ablation["config"]["ablation"]
    other_layer = cli_json(styled_store, "generate", "--user", "calm", "--method", "style-vector", "--set", "layer=0", *llm, QUERY + "Nice day.")
    assert other_layer["output"] is not None
    assert len(Store(styled_store).list_plugins(kind="style-vector")) == 2  # one vector a user: the new layer replaced it


def _versions(store: Path) -> dict:
    return {t["table"]: (t["rows"], t["version"]) for t in Store(store).info()["tables"]}


def test_style_vector_errors_are_one_line(styled_store, tiny_llm_dir):
    llm = ["--llm", str(tiny_llm_dir)]
    generate = ["generate", "--user", "calm", "--method", "style-vector", *llm]
    before = _versions(styled_store)
    assert "--set layer=9: LLM" in cli_fails(styled_store, *generate, "--set", "layer=9", "x")
    assert "takes no such setting (its settings: layer, alpha, items, pairs)" in cli_fails(styled_store, *generate, "--set", "strength=2", "x")
    assert "--set alpha=loud" in cli_fails(styled_store, *generate, "--set", "alpha=loud", "x")
    assert "--set items=0: must be at least 1" in cli_fails(styled_store, *generate, "--set", "items=0", "x")
    assert "--set pairs=llm: expected one of none, rules" in cli_fails(styled_store, *generate, "--set", "pairs=llm", "x")
    assert "expected NAME=VALUE" in cli_fails(styled_store, *generate, "--set", "alpha", "x")
    assert "has no LaMP-7 history item with an input" in cli_fails(styled_store, *generate, "--set", "pairs=none", "x")
    assert _versions(styled_store) == before  # nothing written: no pairs, no vectors
