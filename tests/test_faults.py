"""Faults: `kill -9` at random moments of every writing command, a full disk, a store that cannot be written.

Each command (ingest, adapt, train-oppu, register-sharers, assemble, on a tiny random LLM saved
to disk) first runs once to completion from a saved "before" store, which gives its "after"
state. Then, from copies of "before", it is killed with SIGKILL: at random moments, and once
right after its first new table version lands on disk (between a table write and the command's
commit record). After each kill the store must open holding exactly the state before or after,
and the same command run again must complete with the state after. Commands run in processes
forked from a server that imported persona once, so a kill costs the command's time, not an import.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES
from recipes.kit.splits import user_split
from store import Store

pytestmark = pytest.mark.slow
RANDOM_KILLS = 3  # per command, plus one between a table write and the commit record
TALLY: dict[str, int] = {"kills": 0, "states_checked": 0, "reruns_completed": 0}


def _command(store: str, args: list[str], file_limit: int | None = None) -> None:
    """Child process: run one persona command on `store`, exit with its exit code."""
    if file_limit is not None:  # a full disk: writes past this size fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    from persona_cli.main import app

    code = 0
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        try:
            code = app(["--store", store, *args], prog_name="persona", standalone_mode=False) or 0
        except SystemExit as stop:
            code = stop.code or 0
        except BaseException:  # a traceback: what a user must never see
            code = 99
    os._exit(int(code))


@pytest.fixture(scope="module")
def forks():
    # LanceDB warns at every fork that its runtime may be mid-operation; the server only imported it
    # and never opened a store, so nothing is (the server is a fresh Python that reads this variable)
    os.environ["PYTHONWARNINGS"] = "ignore:lancedb fork support:RuntimeWarning"
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([  # what the commands import, so a forked command starts at once
        "persona_cli.main", "store.db", "recipes.flows.ingest", "recipes.methods.task_lora", "recipes.methods.oppu", "recipes.methods.perpcs.sharers",
        "recipes.methods.perpcs.assembly", "peft", "sentence_transformers", "transformers.models.llama.modeling_llama",
    ])  # fmt: skip
    return context


def _start(forks, store: Path, args: list[str], file_limit: int | None = None):
    process = forks.Process(target=_command, args=(str(store), args, file_limit))
    process.start()
    return process


def _finish(forks, store: Path, args: list[str], file_limit: int | None = None) -> int:
    process = _start(forks, store, args, file_limit)
    process.join(timeout=300)
    return process.exitcode


def state(store: Path) -> dict:
    """What the next command sees: rows of every table, plug-in names, pool tags."""
    opened = Store(str(store))
    return {
        "rows": {name: opened.count(name) for name in opened.table_names()},
        "plugins": [p.name for p in opened.list_plugins()],
        "pool_tags": sorted(opened.pool_tags()),
    }


def _versions(store: Path) -> int:
    return sum(1 for _ in store.glob("*.lance/_versions/*.manifest"))


def _users(tmp: Path, first: int, count: int) -> Path:
    lines = EXAMPLES.read_text(encoding="utf-8").splitlines()[first : first + count]
    path = tmp / f"users-{first}-{count}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_kill_9_at_any_moment_leaves_before_or_after_and_a_rerun_completes(forks, tiny_llm_dir, tmp_path):
    rng = random.Random(0)
    llm = ["--llm", str(tiny_llm_dir)]
    ids = [json.loads(line)["user_id"] for line in EXAMPLES.read_text(encoding="utf-8").splitlines()[:16]]
    tests = [u for u in ids if user_split(u) == "test"][:2]
    sharers = [u for u in ids if user_split(u) == "train"][:2]
    store = tmp_path / "store"
    assert _finish(forks, store, ["ingest", str(_users(tmp_path, 0, 4)), "--task", "LaMP-7"]) == 0
    commands = {
        "ingest": ["ingest", str(_users(tmp_path, 4, 12)), "--task", "LaMP-7"],
        "adapt": ["adapt", "--task", "LaMP-7", "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--max-length", "64", *llm],
        "train-oppu": ["train-oppu", "--task", "LaMP-7", *[a for u in tests for a in ("--user", u)], "--steps", "2", "--max-length", "64", *llm],
        "register-sharers": ["register-sharers", "--task", "LaMP-7", *[a for u in sharers for a in ("--sharer", u)],
                             "--steps", "2", "--gate-steps", "2", "--max-length", "64", *llm],
        "assemble": ["assemble", "--task", "LaMP-7", *[a for u in tests for a in ("--user", u)], "--top-k", "1", "--max-length", "64", *llm],
    }  # fmt: skip
    for name, args in commands.items():
        before_dir = tmp_path / f"before-{name}"
        shutil.copytree(store, before_dir)
        before = state(before_dir)
        started = time.perf_counter()
        assert _finish(forks, store, args) == 0, name
        took = time.perf_counter() - started
        after = state(store)
        assert after != before, f"{name} changed nothing"
        for trial in range(RANDOM_KILLS + 1):
            work = tmp_path / f"work-{name}-{trial}"
            shutil.copytree(before_dir, work)
            first_versions = _versions(work)
            process = _start(forks, work, args)
            if trial < RANDOM_KILLS:
                time.sleep(rng.uniform(0.0, took))
            else:  # right after the command's first table write lands, before its commit record
                while _versions(work) == first_versions and process.is_alive():
                    time.sleep(0.002)
            process.kill()  # SIGKILL; nothing if the command has already finished
            process.join()
            TALLY["kills"] += 1
            seen = state(work)
            assert seen in (before, after), f"{name} killed after {trial}: {seen}"
            TALLY["states_checked"] += 1
            assert _finish(forks, work, args) == 0, f"{name}: the rerun after a kill failed"
            if seen == before:  # (killed after its commit, a rerun of register-sharers rightly adds pool-2)
                assert state(work) == after, name
            TALLY["reruns_completed"] += 1
    assert TALLY["kills"] >= 20
    Path(os.environ["PERSONA_FAULT_TALLY"]).write_text(json.dumps(TALLY), encoding="utf-8")  # printed by conftest


def test_a_full_disk_fails_cleanly_and_changes_nothing(forks, tmp_path):
    """Writes past a file-size limit fail (EFBIG, as on a full disk): one clear error, exit code
    not a traceback's, the store as it was; with room again the same ingest completes."""
    store = tmp_path / "store"
    assert _finish(forks, store, ["ingest", str(_users(tmp_path, 0, 2)), "--task", "LaMP-7"]) == 0
    before = state(store)
    args = ["ingest", str(_users(tmp_path, 2, 10)), "--task", "LaMP-7"]
    code = _finish(forks, store, args, file_limit=16_000)
    assert code == 2, "a full disk must be the one-line user error (exit 2), not success or a traceback"
    assert state(store) == before
    assert _finish(forks, store, args) == 0 and state(store)["rows"]["users"] == 12


def test_a_store_the_process_cannot_write_serves_reads_and_refuses_writes_in_one_line(forks, tmp_path):
    """No file may grow (a file-size limit of 0: a read-only store, as far as a root process can be
    kept from writing): reading commands work, a writing one fails with one error line, nothing changes."""
    store = tmp_path / "store"
    assert _finish(forks, store, ["ingest", str(_users(tmp_path, 0, 2)), "--task", "LaMP-7"]) == 0
    before = state(store)
    assert _finish(forks, store, ["users", "list"], file_limit=0) == 0
    assert _finish(forks, store, ["search", "--user", "0", "the team", "--k", "2"], file_limit=0) == 0
    assert _finish(forks, store, ["ingest", str(_users(tmp_path, 2, 2)), "--task", "LaMP-7"], file_limit=0) == 2
    assert state(store) == before
