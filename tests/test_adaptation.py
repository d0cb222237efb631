"""Task LoRA and OPPU through the CLI with the embedded SmolLM2 on the example users: adapters
are trained, stored, listed, served in mixed-user batches, exported as peft folders that plain
peft loads with the same outputs, imported back, and bad requests change nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from conftest import EXAMPLES, cli_fails, cli_json
from persona_cli.main import app
from recipes.kit.generation import prompt_token_ids
from store import Store

runner = CliRunner()
pytestmark = pytest.mark.slow
PROMPT = "Paraphrase the following tweet without any explanation before or after it: The museum opens early on Sundays."
TEST_USERS = ["2", "4"]


_cli, _fail = cli_json, cli_fails


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Example users with a small task LoRA and OPPU adapters for two test users."""
    path = tmp_path_factory.mktemp("adapt") / "store"
    assert runner.invoke(app, ["--store", str(path), "ingest", str(EXAMPLES), "--task", "LaMP-7"]).exit_code == 0
    return path


@pytest.fixture(scope="module")
def trained(store) -> dict:
    adapted = _cli(store, "adapt", "--task", "LaMP-7", "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--select", "metric")
    oppu = _cli(store, "train-oppu", "--task", "LaMP-7", "--user", "2", "--user", "4", "--steps", "3", "--batch-size", "4")
    return {"adapt": adapted, "oppu": oppu}


def test_adapt_trains_on_training_users_and_stores_the_plugin(store, trained):
    adapted = trained["adapt"]
    assert adapted["name"] == "task-lora-LaMP-7" and adapted["kind"] == "task-lora" and adapted["steps"] == 4
    assert adapted["train_examples"] == 96 and adapted["dev_examples"] == 9  # 32 training users, 3 dev users
    assert adapted["adapter_bytes"] > 0
    assert 0 <= adapted["best_dev_score"] <= 1  # ROUGE-1 of the dev users' queries picks the step
    shown = _cli(store, "plugins", "show", "task-lora-LaMP-7")
    assert [p["step"] for p in shown["curve"]] == [1, 2, 3, 4]
    # --select metric keeps the step with the best dev ROUGE-1 (the first of equals), not the lowest loss
    scores = {p["step"]: p["dev_score"] for p in shown["curve"] if "dev_score" in p}
    assert sorted(scores) == [2, 4] and adapted["best_step"] == max(scores, key=scores.get)
    assert adapted["best_dev_score"] == max(scores.values())
    assert shown["config"]["lora"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert shown["config"]["lora"]["r"] == 8 and shown["config"]["lora"]["alpha"] == 8


def test_oppu_trains_one_adapter_per_user_on_the_task_base_and_resumes(store, trained):
    oppu = trained["oppu"]
    assert oppu["trained"] == 2 and oppu["base"] == "task-lora-LaMP-7" and oppu["mean_adapter_bytes"] > 0
    listed = _cli(store, "plugins", "list", "--kind", "oppu")["plugins"]
    assert [p["name"] for p in listed] == ["oppu-LaMP-7/2", "oppu-LaMP-7/4"]
    assert all(p["metrics"]["train_seconds"] > 0 and p["size"] == p["metrics"]["adapter_bytes"] for p in listed)
    again = _cli(store, "train-oppu", "--task", "LaMP-7", "--user", "2", "--user", "4", "--steps", "3", "--batch-size", "4")
    assert again["trained"] == 0 and again["reused"] == 2


def test_users_with_items_in_task_format_train_on_their_inputs(store, trained):
    shown = _cli(store, "plugins", "show", "oppu-LaMP-7/4")
    history = Store(store).user_history("4")
    assert shown["config"]["examples"] == len(history) and shown["user_id"] == "4"


def test_evaluate_task_lora_and_oppu_on_the_same_queries(store, trained, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("\n".join(TEST_USERS) + "\n")
    common = ["evaluate", "--task", "LaMP-7", "--users", str(users), "--max-new-tokens", "16"]
    task_run = _cli(store, *common, "--method", "task-lora")
    oppu_run = _cli(store, *common, "--method", "oppu", "--batch-size", "4")
    assert task_run["method"] == "task-lora" and task_run["config"]["plugins"] == ["task-lora-LaMP-7"]
    assert oppu_run["method"] == "oppu" and oppu_run["config"]["per_user_adapters"] == 2
    assert oppu_run["n_examples"] == task_run["n_examples"] == 6
    compared = _cli(store, "runs", "compare", task_run["run_id"], oppu_run["run_id"])
    assert compared["shared_queries"] == 6


def test_oppus_ablation_is_its_task_base_on_the_same_queries(store, trained, tmp_path):
    """--ablation serves OPPU's non-personal counterpart: the task LoRA its adapters sit on, which
    answers exactly like --method task-lora (whether OPPU differs is the benchmarks' question: these
    adapters have 3 steps)."""
    users = tmp_path / "users.txt"
    users.write_text("\n".join(TEST_USERS) + "\n")
    common = ["evaluate", "--task", "LaMP-7", "--users", str(users), "--max-new-tokens", "16"]
    ablation = _cli(store, *common, "--method", "oppu", "--ablation")
    task_run = _cli(store, *common, "--method", "task-lora")
    assert ablation["method"] == "oppu-ablation" and ablation["config"]["ablation"].startswith("the task base")
    assert "per_user_adapters" not in ablation["config"] and ablation["config"]["plugins"] == ["task-lora-LaMP-7"]
    raw = lambda run: [p.raw for p in Store(store).run_predictions(run["run_id"])]  # noqa: E731
    assert raw(ablation) == raw(task_run) and len(raw(ablation)) == 6


def test_an_exported_oppu_adapter_loads_in_plain_peft_and_answers_the_same(store, trained, llm, tmp_path):
    """The export folds the task base in, so plain peft on the bare LLM gives persona's answer."""
    ours = _cli(store, "generate", "--user", "4", "--method", "oppu", "--max-new-tokens", "20", PROMPT)["output"]
    exported = _cli(store, "plugins", "export", "oppu-LaMP-7/4", str(tmp_path / "peft"))
    assert exported["folded_bases"] == ["task-lora-LaMP-7"] and exported["rank"] == 16


    model = PeftModel.from_pretrained(copy.deepcopy(llm.model), str(tmp_path / "peft")).eval()
    ids = torch.tensor([prompt_token_ids(llm, PROMPT)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    theirs = llm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert theirs == ours
    with torch.no_grad():  # and the adapter is not a no-op: it moves the bare LLM's next-token logits
        moved = (model(input_ids=ids).logits[0, -1] - llm.model(input_ids=ids).logits[0, -1]).abs().max()
    assert moved > 1e-3


def test_an_imported_adapter_serves_like_the_original(store, trained, tmp_path):
    _cli(store, "plugins", "export", "task-lora-LaMP-7", str(tmp_path / "task"))
    imported = _cli(store, "plugins", "import", str(tmp_path / "task"), "--name", "task-again", "--kind", "task-lora", "--task", "LaMP-7")
    assert imported["name"] == "task-again"
    first = _cli(store, "generate", "--user", "2", "--method", "task-lora", "--max-new-tokens", "16", PROMPT)["output"]
    again = _cli(store, "generate", "--user", "2", "--method", "task-lora", "--plugin", "task-again", "--max-new-tokens", "16", PROMPT)
    assert again["output"] == first
    from recipes.kit.plugins import lora_weights

    def deltas(name: str) -> dict:
        weights = lora_weights(Store(store).get_plugin(name))
        return {path: weights.scales[path] * b @ a for path, (a, b) in weights.modules.items()}

    original, back = deltas("task-lora-LaMP-7"), deltas("task-again")
    assert original.keys() == back.keys() and all(torch.allclose(original[p], back[p], atol=1e-6) for p in original)
    assert max(float(d.abs().max()) for d in original.values()) > 1e-4  # a trained adapter, not zeros


MODEL_FREE = [  # refused before any model loads: a typo costs no model load
    (["adapt", "--task", "LaMP-7", "--steps", "1"], "plug-in 'task-lora-LaMP-7' exists; pass --replace"),
    (["adapt", "--task", "LaMP-7", "--name", "x", "--base", "nothing"], "no plug-in 'nothing'"),
    (["adapt", "--task", "LaMP-7", "--name", "x", "--r", "0"], "--r must be at least 1"),
    (["train-oppu", "--task", "LaMP-7"], "exactly one of --user, --split or --users"),
    (["train-oppu", "--task", "LaMP-7", "--user", "nobody"], "no user 'nobody'"),
    (["train-oppu", "--task", "LaMP-7", "--user", "2", "--base", "nothing"], "no plug-in 'nothing'"),
    (["register-sharers", "--task", "LaMP-7", "--sharer", "nobody"], "no user 'nobody'"),
    (["register-sharers", "--task", "LaMP-7", "--sharer", "2"], "user '2' is a test user"),
    (["assemble", "--task", "LaMP-7", "--user", "2"], "no piece pool yet"),
    (["train-embedder", "--task", "LaMP-7", "--base", "nothing"], "no plug-in 'nothing'"),
    (["evaluate", "--task", "LaMP-7", "--method", "oppu", "--split", "train", "--limit", "4"], "users have no OPPU adapter"),
    (["evaluate", "--task", "LaMP-7", "--method", "task-lora", "--plugin", "missing"], "no plug-in 'missing'"),
    (["evaluate", "--task", "LaMP-7", "--method", "rag", "--plugin", "x"], "--plugin goes with --method task-lora, oppu"),
    (["evaluate", "--task", "LaMP-7", "--method", "task-lora", "--ablation"], "--ablation goes with a personal method"),
    (["generate", "--user", "2", "--method", "rag", "--ablation", "hello"], "--ablation of rag serves each user with another user's history"),
    (["adapt", "--task", "LaMP-7", "--name", "x", "--pairs", "llm"], "--pairs llm: expected one of none, rules"),
    (["train-oppu", "--task", "LaMP-7", "--user", "2", "--pairs", "llm"], "--pairs llm: expected one of none, rules"),
    (["register-sharers", "--task", "LaMP-7", "--sharer", "0", "--pairs", "llm"], "--pairs llm: expected one of none, rules"),
    (["train-embedder", "--task", "LaMP-7", "--pairs", "llm"], "--pairs llm: expected one of none, rules"),
    (["plugins", "export", "nothing", "out"], "no plug-in 'nothing'"),
    (["plugins", "import", "no-such-dir", "--name", "y"], "no adapter_config.json"),
]


@pytest.mark.parametrize("args,message", MODEL_FREE)
def test_adapter_errors_are_one_line_change_nothing_and_load_no_model(store, trained, args, message, monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("the LLM was loaded before the arguments were checked")

    monkeypatch.setattr("recipes.kit.backbones.load_llm", no_model)  # every command imports it from there when it runs
    before = Store(store).info()["tables"]
    assert message in _fail(store, *args)
    assert Store(store).info()["tables"] == before


def test_an_unknown_target_module_is_one_line_and_changes_nothing(store, trained):
    before = Store(store).info()["tables"]
    assert "no linear layer named 'qq_proj'" in _fail(store, "adapt", "--task", "LaMP-7", "--name", "x", "--target-modules", "qq_proj", "--steps", "1")
    assert Store(store).info()["tables"] == before


def test_a_stopped_oppu_run_stores_nothing_resumes_and_a_replaced_base_retrains(store, trained, llm):
    """Adapters are staged until the run ends (none stored by a run that stops), a rerun takes the
    staged ones instead of training them again, and an adapter is kept only while the base's
    weights are the same, not just its name."""
    from recipes.methods.oppu import train_oppu
    from recipes.kit.training_loop import LoraSettings
    from recipes.kit.tasks import get_task

    _cli(store, "adapt", "--task", "LaMP-7", "--name", "base-b", "--steps", "2", "--batch-size", "4", "--eval-every", "2")

    def stop_after_first(stage: str, done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    settings = LoraSettings(steps=2, batch_size=4, learning_rate=1e-3, epochs=2.0)  # as train-oppu below
    with pytest.raises(KeyboardInterrupt):
        train_oppu(Store(store), copy.deepcopy(llm), get_task("LaMP-7"), ["2", "4"], settings, "g", "base-b", progress=stop_after_first)
    assert not [p for p in _cli(store, "plugins", "list", "--kind", "oppu")["plugins"] if p["name"].startswith("g/")]
    oppu = ["train-oppu", "--task", "LaMP-7", "--user", "2", "--user", "4", "--name", "g", "--base", "base-b", "--steps", "2", "--batch-size", "4"]
    resumed = _cli(store, *oppu)
    assert (resumed["resumed"], resumed["trained"], resumed["reused"]) == (1, 1, 0)
    assert (_cli(store, *oppu)["reused"]) == 2
    _cli(store, "adapt", "--task", "LaMP-7", "--name", "base-b", "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--seed", "1", "--replace")
    again = _cli(store, *oppu)
    assert (again["trained"], again["reused"]) == (2, 0) and set(again["stale"]) == {"2", "4"}  # and says why


def test_pag_profiles_are_stored_with_their_run_and_keyed_by_the_merged_base(store, trained, monkeypatch):
    """An evaluation that fails after writing profiles stores none; a profile written by the bare
    LLM is not reused when a base is merged into it (another model wrote it)."""
    pag = ["evaluate", "--task", "LaMP-7", "--method", "pag", "--limit", "1", "--max-new-tokens", "4"]

    def fails(*_, **__):
        raise RuntimeError("generation failed")

    with monkeypatch.context() as patch:
        patch.setattr("recipes.flows.evaluate.answer_prompts", fails)
        assert runner.invoke(app, ["--store", str(store), *pag, "--json"]).exit_code != 0
    assert Store(store).count("profiles") == 0
    assert _cli(store, *pag)["config"]["profiles_written"] == 1
    assert _cli(store, *pag, "--base", "task-lora-LaMP-7")["config"]["profiles_written"] == 1
    assert _cli(store, *pag)["config"]["profiles_written"] == 0
