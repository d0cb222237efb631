"""Shared fixtures: the real embedded models (loaded once), tiny random models, data paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "users.jsonl"
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """A file of ../shared/data, or skip the test when the data is not beside the checkout."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


@pytest.fixture(scope="session")
def encoder():
    from recipes.kit.backbones import load_encoder

    return load_encoder(device="cpu")


@pytest.fixture(scope="session")
def llm():
    from recipes.kit.backbones import load_llm

    return load_llm(device="cpu")


@pytest.fixture(scope="session")
def tokenizer_dir():
    from recipes.kit.backbones import embedded_llm_cache

    return embedded_llm_cache()


@pytest.fixture(scope="session")
def tiny_llama(tokenizer_dir):
    """A 2-layer random Llama with the embedded tokenizer (chat template included): fast mechanics."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    from recipes.kit.backbones import prepare_llm

    return prepare_llm("tiny-llama", LlamaForCausalLM(config), tokenizer, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, tiny_llama) -> Path:
    """The tiny random Llama saved where `--llm PATH` loads it: CLI mechanics in seconds."""
    folder = tmp_path_factory.mktemp("tiny-llm")
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5(tokenizer_dir):
    """A 2-layer random T5 for the seq2seq path."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = None
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    from recipes.kit.backbones import prepare_llm

    return prepare_llm("tiny-t5", T5ForConditionalGeneration(config), tokenizer, torch.device("cpu"))


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def few_users(tmp_path: Path) -> Path:
    """The first 3 example users, as a small users.jsonl."""
    lines = EXAMPLES.read_text(encoding="utf-8").splitlines()[:3]
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cli_json(store: Path, *args: str) -> dict:
    """Run `persona --store STORE ARGS --json`, expect success, return the parsed output."""
    from typer.testing import CliRunner

    from persona_cli.main import app

    result = CliRunner().invoke(app, ["--store", str(store), *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ingested(tmp_path: Path, users: list[dict], task: str = "LaMP-7") -> Path:
    """A store at tmp_path/store holding these users.jsonl records, ingested through the CLI."""
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(user) + "\n" for user in users), encoding="utf-8")
    path = tmp_path / "store"
    cli_json(path, "ingest", str(data), "--task", task)
    return path


def run_outputs(store: Path, run: dict) -> dict[str, str]:
    """A stored run's scored answers by query id (`runs show`)."""
    return {p["query_id"]: p["output"] for p in cli_json(store, "runs", "show", run["run_id"], "--examples", "10")["predictions"]}


def cli_fails(store: Path, *args: str) -> str:
    """Run `persona --store STORE ARGS`, expect the one-line user error (exit 2), return it."""
    from typer.testing import CliRunner

    from persona_cli.main import app

    result = CliRunner().invoke(app, ["--store", str(store), *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0, result.output
    return result.output


def pytest_configure(config) -> None:
    """A file the fault suite writes its counts to: with pytest-xdist it runs in a worker process,
    and the summary is printed by the main one."""
    import os
    import tempfile

    if "PERSONA_FAULT_TALLY" not in os.environ:
        config._persona_tally_dir = tempfile.mkdtemp(prefix="persona-faults-")  # made (and removed) by this process only
        os.environ["PERSONA_FAULT_TALLY"] = os.path.join(config._persona_tally_dir, "tally.json")


def pytest_unconfigure(config) -> None:
    import os
    import shutil

    made = getattr(config, "_persona_tally_dir", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
        os.environ.pop("PERSONA_FAULT_TALLY", None)


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault suite's counts, printed after the run when it ran."""
    import os

    path = Path(os.environ.get("PERSONA_FAULT_TALLY", ""))
    if path.is_file():
        tally = json.loads(path.read_text(encoding="utf-8"))
        terminalreporter.write_line(
            f"fault suite: {tally['kills']} kill -9s of 5 writing commands, {tally['states_checked']} stores checked "
            f"(each exactly as before or after the command), {tally['reruns_completed']} reruns completed"
        )


# The longest test files, longest first (about this many seconds of one worker, from `pytest
# --durations` on the 2-core AVX2 machine): the PPlug CLI tests 542 (their fixture trains a task LoRA
# and the embedder), Per-Pcs 471 (ten sharers registered), adaptation 151, the fault suite 118,
# evaluation 85. `make test` runs files on two workers in this order (--no-loadscope-reorder), so
# the two longest start at once instead of one of them being handed out late, when the other worker
# has little left to do.
LONGEST_FILES = ("test_pplug_cli.py", "test_perpcs.py", "test_adaptation.py", "test_faults.py", "test_evaluation.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: n for n, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
