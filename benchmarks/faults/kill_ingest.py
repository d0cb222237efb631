"""kill -9 during `persona ingest`: does the next reader see a consistent store, and does a rerun finish?

A store of 50 users (copies of the bundled example users) receives an ingest of `--users` more (400); each
trial kills the ingest at one moment, then checks the store as the next command sees it and runs
the ingest again. Half the trials kill at a random moment, half right after a table's new version
appears on disk (between two table writes of one command, where a half-written store would show).
Consistent means: exactly the 50 users from before, each user row counting exactly the items
and queries the other tables hold for it, and no item or query of a user missing from `users`.

    python benchmarks/faults/kill_ingest.py [--trials 16] [--users 400] [--seed 0] [--out benchmarks/faults/results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from store import Store  # noqa: E402

EXAMPLES = ROOT / "examples" / "users.jsonl"


def users_file(path: Path, first: int, count: int) -> None:
    """`count` users numbered from `first`, each a copy of an example user under a new id."""
    examples = [json.loads(line) for line in EXAMPLES.read_text(encoding="utf-8").splitlines()]
    with path.open("w", encoding="utf-8") as out:
        for n in range(first, first + count):
            user = json.loads(json.dumps(examples[n % len(examples)]))
            user["user_id"] = f"u{n}"
            for item in user["history"]:
                item["id"] = f"u{n}-{item['id']}"
            for query in user.get("queries", []):
                query["id"] = f"u{n}-{query['id']}"
            out.write(json.dumps(user) + "\n")


def ingest_command(store: Path, users: Path) -> list[str]:
    return [sys.executable, "-c", "from persona_cli.main import app; app()", "--store", str(store), "ingest", str(users), "--task", "LaMP-7", "--json"]


def versions_on_disk(store: Path) -> int:
    """How many table versions exist on disk: grows by one with every table write."""
    return sum(1 for _ in store.glob("*.lance/_versions/*.manifest"))


def consistency(store: Path) -> dict:
    """What the next command sees, and whether its tables agree with each other."""
    opened = Store(str(store))
    users = {u.user_id: u for u in opened.list_users()}
    items = Counter(_user_ids(opened, "behaviors"))
    queries = Counter(_user_ids(opened, "queries"))
    agree = all(u.n_items == items.get(uid, 0) and u.n_queries == queries.get(uid, 0) for uid, u in users.items())
    orphans = sorted(set(items) - set(users)) + sorted(set(queries) - set(users))
    return {"users": len(users), "items": sum(items.values()), "queries": sum(queries.values()), "rows_agree": agree, "orphan_users": len(orphans)}


def _user_ids(opened: Store, table: str) -> list[str]:
    """The user id of every row of a table, read as any command reads it (the committed version)."""
    found = opened._open(table)
    return [] if found is None else found.to_arrow().column("user_id").to_pylist()


def trial(base: Path, users: Path, added: int, work: Path, mode: str, rng: random.Random, full_s: float) -> dict:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(base, store)
    before = versions_on_disk(store)
    process = subprocess.Popen(ingest_command(store, users), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    started = time.perf_counter()
    if mode == "random":
        time.sleep(rng.uniform(0.0, full_s))
    else:  # right after the n-th new table version appears: between two writes of the command
        wanted = before + rng.randint(1, 3)
        while versions_on_disk(store) < wanted and process.poll() is None:
            time.sleep(0.005)
    killed_at = time.perf_counter() - started
    finished_first = process.poll() is not None
    process.send_signal(signal.SIGKILL)
    process.wait()
    seen = consistency(store)
    rerun = subprocess.run(ingest_command(store, users), capture_output=True, text=True, cwd=ROOT)
    after = consistency(store)
    return {
        "mode": mode, "killed_after_s": round(killed_at, 2), "finished_before_kill": finished_first, "seen_after_kill": seen,
        "consistent": seen["rows_agree"] and seen["orphan_users"] == 0 and seen["users"] in (50, 50 + added),
        "unchanged": seen["users"] == 50, "rerun_exit": rerun.returncode, "after_rerun": after,
        "rerun_complete": rerun.returncode == 0 and after["users"] == 50 + added and after["rows_agree"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--users", type=int, default=400, help="Users in the ingest that is killed.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        users_file(work / "first.jsonl", 0, 50)
        users_file(work / "more.jsonl", 50, args.users)
        base = work / "base"
        subprocess.run(ingest_command(base, work / "first.jsonl"), check=True, capture_output=True, cwd=ROOT)
        timing = work / "timing"
        shutil.copytree(base, timing)
        started = time.perf_counter()
        subprocess.run(ingest_command(timing, work / "more.jsonl"), check=True, capture_output=True, cwd=ROOT)
        full_s = time.perf_counter() - started
        trials = []
        for n in range(args.trials):
            result = trial(base, work / "more.jsonl", args.users, work, "random" if n % 2 == 0 else "between-writes", rng, full_s)
            trials.append(result)
            print(json.dumps(result), flush=True)
    summary = {
        "command": "python benchmarks/faults/kill_ingest.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "users_before": 50,
        "users_ingested": args.users,
        "uninterrupted_ingest_s": round(full_s, 1),
        "trials": len(trials),
        "consistent_after_kill": sum(t["consistent"] for t in trials),
        "unchanged_after_kill": sum(t["unchanged"] for t in trials),
        "rerun_complete": sum(t["rerun_complete"] for t in trials),
        "per_trial": trials,
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_trial"}, indent=2))


if __name__ == "__main__":
    main()
