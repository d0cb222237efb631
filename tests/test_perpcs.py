"""Per-Pcs through the CLI with the embedded SmolLM2 on the example users (planted styles): sharers
are registered as a tagged pool version, targets are assembled without training, the weights
fall on sharers of the target's style, assembled adapters serve mixed-user batches, export as
peft folders that plain peft loads, and bad requests change nothing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from conftest import EXAMPLES, cli_fails, cli_json
from persona_cli.main import app
from recipes.kit.generation import prompt_token_ids
from recipes.methods.perpcs.pool import read_pool
from store import Store

runner = CliRunner()
pytestmark = pytest.mark.slow
PROMPT = "Paraphrase the following tweet without any explanation before or after it: The museum opens early on Sundays."
STYLES = {json.loads(line)["user_id"]: json.loads(line)["style"] for line in EXAMPLES.read_text().splitlines()}
# one non-test sharer for each of the ten planted styles
SHARERS = ["0", "1", "12", "3", "14", "5", "6", "7", "18", "9"]
MASS_FLOOR, TOP3_FLOOR = 0.12, 7  # chance: 0.10 and 3.9 of 13 (p=0.3 each; 7 or more by chance: 6%); measured (float32) 0.193 and 9 of 13 (0.174 while assembly dropped the shared instruction)
MEAN_GATE_FLOOR = 0.6  # chance 0.25; measured 0.99 (float32, 1 LoRA step per sharer, 2026-12-07)
TRAINING = ["--steps", "6", "--gate-steps", "6", "--max-length", "128", "--batch-size", "4"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("perpcs") / "store"
    assert runner.invoke(app, ["--store", str(path), "ingest", str(EXAMPLES), "--task", "LaMP-7"]).exit_code == 0
    return path


@pytest.fixture(scope="module")
def registered(store) -> dict:
    sharers = [arg for s in SHARERS for arg in ("--sharer", s)]
    return cli_json(store, "register-sharers", "--task", "LaMP-7", *sharers, *TRAINING)


@pytest.fixture(scope="module")
def test_users_assembled(store, registered) -> dict:
    return cli_json(store, "assemble", "--task", "LaMP-7", "--split", "test", "--top-k", "1")


def _tables(store: Path) -> dict[str, int]:
    s = Store(store)
    return {t["table"]: (t["rows"], t["version"]) for t in s.info()["tables"]}


def test_register_sharers_writes_one_tagged_pool_version(store, registered):
    assert registered["tags"] == ["pool-1"] and registered["sharers"] == SHARERS and registered["base"] is None
    assert registered["pieces"] == 10 * 120  # q/k/v/o of 30 layers per sharer
    assert registered["mean_gate_seconds"] > 0 and registered["mean_lora_seconds"] > 0
    listed = cli_json(store, "pool", "list")["versions"]
    assert [v["tags"] for v in listed] == [["pool-1"]] and listed[0]["sharers"] == {"LaMP-7": 10}
    shown = cli_json(store, "pool", "show", "pool-1")
    entry = shown["tasks"]["LaMP-7"]
    assert entry["modules"] == {"q_proj": 300, "k_proj": 300, "v_proj": 300, "o_proj": 300}
    assert all(info["pieces"] == 120 and info["gate_final_loss"] is not None for info in entry["sharers"].values())


def test_assemble_user_42_top_3_as_written_is_stored_and_repeatable(store, registered):
    first = cli_json(store, "assemble", "--user", "42", "--top-k", "3", "--explain")
    second = cli_json(store, "assemble", "--user", "42", "--top-k", "3", "--explain")
    user = first["users"]["42"]
    assert first["pool"] == "pool-1" and first["top_k"] == 3
    assert user["modules"] == second["users"]["42"]["modules"]  # same pool version, same weights
    assert len(user["modules"]) == 120 and all(len(p) == 3 for p in user["modules"].values())
    assert all(abs(sum(c["weight"] for c in p) - 1) < 1e-4 for p in user["modules"].values())
    assert user["stored_bytes"] < 2400  # indices and weights only: OPPU stores 3.7 MB per user
    assert len(Store(store).list_assemblies("LaMP-7", "42")) == 1  # replaced, not duplicated
    result = runner.invoke(app, ["--store", str(store), "assemble", "--user", "42", "--top-k", "3", "--explain"])
    assert result.exit_code == 0 and "chosen pieces per layer" in result.output


def test_assembled_weights_lean_towards_sharers_of_the_target_users_style(test_users_assembled):
    """One sharer per style and top-1 per module: the share of modules that pick the target's own
    style is 1 in 10 by chance. Measured here (seeded): see the thresholds' comments."""
    masses = {u: info["sharer_mass"] for u, info in test_users_assembled["users"].items()}
    same = {u: sum(w for s, w in mass.items() if STYLES[s] == STYLES[u]) for u, mass in masses.items()}
    in_top3 = [u for u, mass in masses.items() if any(STYLES[s] == STYLES[u] for s in list(mass)[:3])]
    assert len(same) == 13
    mean = sum(same.values()) / len(same)
    print(f"same-style weight mass {mean:.3f} (chance 0.100); own style among the 3 heaviest sharers for {len(in_top3)} of 13")
    assert mean >= MASS_FLOOR, same
    assert len(in_top3) >= TOP3_FLOOR, masses


def test_mean_gates_give_each_target_the_sharer_who_writes_like_them(tmp_path):
    """`--gates mean` (no gate training): four sharers of four planted styles, top-1 per module;
    the styled test users get their own style's sharer for most modules (chance: 1 in 4; trained
    gates gave 0.243 on the demo's store). Measured here (float32): see MEAN_GATE_FLOOR."""
    store = tmp_path / "store"
    assert runner.invoke(app, ["--store", str(store), "ingest", str(EXAMPLES), "--task", "LaMP-7"]).exit_code == 0
    four = [arg for s in ("12", "6", "14", "18") for arg in ("--sharer", s)]
    registered = cli_json(store, "register-sharers", "--task", "LaMP-7", *four, "--gates", "mean", "--steps", "1", "--max-length", "128",
                          "--batch-size", "4", "--precision", "float32")  # fmt: skip
    assert registered["sharers"] == ["12", "6", "14", "18"]
    assert cli_json(store, "pool", "show", "pool-1")["tasks"]["LaMP-7"]["gates"] == "mean"
    styled = [u for u in STYLES if u in ("2", "4", "8", "32", "34", "36", "38")]  # test users of those four styles
    assembled = cli_json(store, "assemble", "--task", "LaMP-7", *[a for u in styled for a in ("--user", u)], "--top-k", "1",
                         "--precision", "float32")["users"]  # fmt: skip
    same = {u: sum(w for s, w in info["sharer_mass"].items() if STYLES[s] == STYLES[u]) for u, info in assembled.items()}
    print(f"same-style weight mass with mean gates: {same}")
    assert len(same) == 7 and sum(same.values()) / len(same) >= MEAN_GATE_FLOOR, same
    # one pool holds one kind of gate: adding trained-gate sharers to it is refused before any training
    message = cli_fails(store, "register-sharers", "--task", "LaMP-7", "--sharer", "0", "--steps", "1")
    assert "keeps sharers with mean gates (6, 12, 14, 18)" in message


def test_perpcs_serves_mixed_user_batches_like_one_user_at_a_time(store, test_users_assembled):
    (store.parent / "users.txt").write_text("2\n4\n8\n")
    run = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "perpcs", "--users", str(store.parent / "users.txt"))
    assert run["method"] == "perpcs" and run["config"]["pool"] == "pool-1" and run["config"]["per_user_adapters"] == 3
    predictions = Store(store).run_predictions(run["run_id"])
    for prediction in predictions[::4]:  # users 2 and 8, answered alone
        query = next(q for q in Store(store).user_queries(prediction.user_id) if q.query_id == prediction.query_id)
        alone = cli_json(store, "generate", "--user", prediction.user_id, "--method", "perpcs", query.input)
        assert alone["raw"] == prediction.raw


def test_perpcs_with_rag_and_the_peft_retrieval_baseline_run(store, test_users_assembled):
    users = store.parent / "users.txt"
    users.write_text("2\n4\n")
    rag = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "perpcs+rag", "--k", "1", "--users", str(users))
    retrieval = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "peft-retrieval", "--top-k", "2", "--users", str(users))
    assert rag["method"] == "perpcs+rag-bm25-k1" and rag["n_examples"] == 6
    assert retrieval["method"] == "peft-retrieval-k2" and retrieval["config"]["top_k"] == 2


def test_perpcs_ablation_mixes_every_sharer_equally_for_every_user(store, test_users_assembled, llm):
    """--ablation is Per-Pcs with uniform gates: one adapter, each module the mean of all ten
    sharers' pieces, the same for every user, so personal assemblies and it can be compared."""
    from recipes.flows.serve import MethodRequest, plan_serving
    from recipes.kit.tasks import get_task

    plan = plan_serving(Store(store), get_task("LaMP-7"), MethodRequest("perpcs", ablation=True), ["2", "4", "2"])
    assert plan.details["per_user_adapters"] == 1 and plan.details["ablation"].startswith("uniform gates")
    rows = plan.edit(llm, [])
    pool = read_pool(Store(store), "LaMP-7", Store(store).resolve_pool(None))
    path = "model.layers.3.self_attn.v_proj"
    module = pool.modules[path]
    weights = rows.stack([0, 1, 2])[path].weights  # (rows, pieces × rank)
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    served = (rows.a[path].T * weights[0]) @ rows.b[path]  # the update x·A·diag(w)·B of every row, as (in, out)
    expected = sum(module.b[i] @ module.a[i] for i in range(len(module.sharers))) / len(module.sharers)
    assert len(module.sharers) == 10 and torch.allclose(served.T, expected, atol=1e-6)
    (store.parent / "users.txt").write_text("2\n4\n")
    run = cli_json(store, "evaluate", "--task", "LaMP-7", "--method", "perpcs", "--ablation", "--users", str(store.parent / "users.txt"))
    assert run["method"] == "perpcs-ablation" and run["config"]["per_user_adapters"] == 1 and run["n_examples"] == 6


def test_an_exported_assembly_loads_in_plain_peft_and_answers_the_same(store, llm, registered, tmp_path):
    cli_json(store, "assemble", "--user", "8", "--top-k", "3")
    facts = cli_json(store, "pool", "export", str(tmp_path / "user-8"), "--user", "8")
    assert facts["rank"] == 3 * 8 and facts["modules"] == 120 and facts["folded_bases"] == []
    ours = cli_json(store, "generate", "--user", "8", "--method", "perpcs", PROMPT)["raw"]
    model = PeftModel.from_pretrained(copy.deepcopy(llm.model), str(tmp_path / "user-8"))
    ids = torch.tensor([prompt_token_ids(llm, PROMPT)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
    assert llm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == ours.strip()


def test_a_new_registration_grows_the_pool_and_old_assemblies_stay_exact(store, registered):
    before = cli_json(store, "assemble", "--user", "42", "--top-k", "3", "--explain")["users"]["42"]["modules"]
    grown = cli_json(store, "register-sharers", "--task", "LaMP-7", "--sharer", "21", "--tag", "with-21", *TRAINING[:2], "--gate-steps", "2")
    assert grown["tags"] == ["pool-2", "with-21"]
    diff = cli_json(store, "pool", "diff", "pool-1", "pool-2")
    assert diff["sharers_added"] == ["LaMP-7/21"] and diff["pieces_added"] == 120 and diff["pieces_removed"] == 0
    again = cli_json(store, "assemble", "--user", "42", "--top-k", "3", "--pool", "pool-1", "--explain")["users"]["42"]["modules"]
    assert again == before
    cli_json(store, "pool", "tag", "pool-1", "first-ten")
    assert cli_json(store, "pool", "show", "first-ten")["version"] == registered["pool_version"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["register-sharers", "--task", "LaMP-7", "--candidates", "test"], "test users never become sharers"),
        (["register-sharers", "--task", "LaMP-7", "--sharer", "nobody"], "no user 'nobody'"),
        (["register-sharers", "--task", "LaMP-7", "--sharer", "0", "--share-ratio", "0"], "--share-ratio"),
        (["register-sharers", "--task", "LaMP-7", "--sharer", "0", "--tag", "pool-1"], "exists"),
        (["register-sharers", "--task", "LaMP-7", "--sharer", "2"], "test users never become sharers"),
        (["register-sharers", "--task", "LaMP-7", "--sharer", "0", "--tag", "my tag"], "tag 'my tag'"),
        (["assemble", "--user", "nobody"], "no user 'nobody'"),
        (["assemble", "--user", "42", "--top-k", "0"], "--top-k"),
        (["assemble", "--user", "42", "--pool", "pool-99"], "no pool tag 'pool-99'"),
        (["evaluate", "--task", "LaMP-7", "--method", "perpcs", "--split", "train"], "have no assembly against pool"),
        (["evaluate", "--task", "LaMP-7", "--method", "none", "--pool", "pool-1"], "--pool goes with"),
        (["evaluate", "--task", "LaMP-7", "--method", "perpcs+magic"], "--method perpcs+magic"),
        (["pool", "tag", "pool-1", "pool-1"], "exists"),
        (["pool", "export", "/tmp/never-written", "--user", "40"], "has no LaMP-7 assembly"),
    ],
)
def test_bad_requests_fail_in_one_line_and_change_nothing(store, registered, args, message):
    before = _tables(store)
    assert message in cli_fails(store, *args)
    assert _tables(store) == before


def test_a_stopped_registration_resumes_from_finished_sharers(store, llm, monkeypatch, tmp_path):
    from recipes.methods.perpcs.gates import GateSettings
    from recipes.kit.training_loop import LoraSettings
    from recipes.methods.perpcs.sharers import register_sharers
    from recipes.kit.tasks import get_task

    monkeypatch.setenv("PERSONA_CACHE", str(tmp_path))
    lora, gates = LoraSettings(steps=2, batch_size=2, max_length=96), GateSettings(steps=2, batch_size=2, max_length=96)

    def stop_after_first(stage: str, done: int, total: int) -> None:
        if stage == "registering sharers" and done == 1:
            raise KeyboardInterrupt

    opened = Store(store)
    before = opened.pool_tags()
    with pytest.raises(KeyboardInterrupt):
        register_sharers(opened, llm, get_task("LaMP-7"), ["22", "23"], lora, gates, progress=stop_after_first)
    assert opened.pool_tags() == before  # nothing half-registered
    result = register_sharers(opened, llm, get_task("LaMP-7"), ["22", "23"], lora, gates)
    assert result.resumed == ["22"] and result.sharers == ["22", "23"]
    # staged sharers are keyed by their history too: one more item, and the stopped run's sharer is trained again
    with pytest.raises(KeyboardInterrupt):
        register_sharers(Store(store), llm, get_task("LaMP-7"), ["22", "23"], lora, gates, progress=stop_after_first)
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"user_id": "22", "history": [{"id": "u22-more", "text": "one more tweet", "input": "One more tweet."}]}) + "\n")
    assert runner.invoke(app, ["--store", str(store), "ingest", str(more), "--task", "LaMP-7"]).exit_code == 0
    assert register_sharers(Store(store), llm, get_task("LaMP-7"), ["22", "23"], lora, gates).resumed == []
