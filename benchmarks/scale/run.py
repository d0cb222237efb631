"""Benchmark: the store layer at scale, persona against raw LanceDB doing the same work on the same data.

A synthetic store of --users users with --items history items each (vectors generated, normalized,
not encoded, so the store is what is measured) is written twice, each side in its own process
(so peak memory is that side's), --chunk users per write: through persona's Store (transaction,
upsert of the items, user statistics recounted, indexes kept up to date) and straight into LanceDB
tables of the same schema with the same upserts (merge_insert on the same keys; the user rows are
written as given). Generating the data is not timed. Then, per side: the indexes (a scalar index on
user ids; persona decides which it makes), per-user top-k vector search latency p50/p99 over
--searches random users, and user listing (a page of 50 users in id order at the start and in the
middle; raw LanceDB keeps no order, so its side sorts the ids with Arrow and fetches the page, and
its page in storage order is reported beside). Each
figure is reported for both sides with the persona/raw ratio (throughput: persona/raw; times:
raw/persona, so 1.0 is parity and higher is better for persona either way).

    .venv/bin/python benchmarks/scale/run.py [--users 100000] [--items 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DIM = 384
TASK = "synthetic"
ENCODER = "synthetic-384"


def chunk_arrays(first_user: int, users: int, items: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    """User ids, item ids and unit vectors of users first_user .. first_user+users-1 (the same for both sides)."""
    rng = np.random.default_rng([seed, first_user])
    vectors = rng.standard_normal((users * items, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    user_ids = [str(first_user + n // items) for n in range(users * items)]
    item_ids = [f"{first_user + n // items}-{n % items}" for n in range(users * items)]
    return user_ids, item_ids, vectors


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------- persona's side ----------


def persona_write(path: Path, args: argparse.Namespace) -> dict:
    from store import Behavior, Store

    store = Store(str(path))
    seconds = 0.0
    for first in range(0, args.users, args.chunk):
        count = min(args.chunk, args.users - first)
        user_ids, item_ids, vectors = chunk_arrays(first, count, args.items, args.seed)
        started = time.perf_counter()  # generating the data is not timed; making persona's records is

        def batches():
            for start in range(0, len(user_ids), 8192):
                yield [
                    Behavior(item_id=i, user_id=u, task=TASK, text="", vector=v)
                    for i, u, v in zip(item_ids[start : start + 8192], user_ids[start : start + 8192], vectors[start : start + 8192])
                ]

        store.ingest(batches(), [], {str(u): {} for u in range(first, first + count)}, ENCODER, DIM)
        seconds += time.perf_counter() - started
    return {"write_s": seconds}


def persona_read(path: Path, args: argparse.Namespace) -> dict:
    from store import Store

    store = Store(str(path))
    started = time.perf_counter()
    made = store.ensure_indexes()
    result = {"index_s": time.perf_counter() - started, "indexes": made}
    rng = np.random.default_rng(args.seed + 1)
    users = [str(u) for u in rng.integers(0, args.users, args.searches)]
    queries = rng.standard_normal((args.searches, DIM), dtype=np.float32)
    store.search_history(users[0], queries[0], k=5, task=TASK)  # warm-up
    latencies, found = [], 0
    for user, query in zip(users, queries):
        begun = time.perf_counter()
        found += len(store.search_history(user, query, k=5, task=TASK))
        latencies.append(time.perf_counter() - begun)
    result.update(_latency(latencies), hits_per_search=found / len(users))
    for name, offset in (("list_first_page_s", 0), ("list_middle_page_s", args.users // 2)):
        begun = time.perf_counter()
        page = store.list_users(limit=50, offset=offset)
        result[name] = time.perf_counter() - begun
        result[name.replace("_s", "_rows")] = len(page)
    return result


# ---------- raw LanceDB's side ----------


def raw_write(path: Path, args: argparse.Namespace) -> dict:
    import lancedb
    import pyarrow as pa

    from store import schemas

    db = lancedb.connect(str(path))
    schema = schemas.behaviors(DIM)
    behaviors = users_table = None
    seconds = 0.0
    for first in range(0, args.users, args.chunk):
        count = min(args.chunk, args.users - first)
        user_ids, item_ids, vectors = chunk_arrays(first, count, args.items, args.seed)
        started = time.perf_counter()

        def batches():
            for start in range(0, len(user_ids), 8192):
                end = start + 8192
                n = len(user_ids[start:end])
                yield pa.RecordBatch.from_arrays([
                    pa.array(item_ids[start:end], pa.string()), pa.array(user_ids[start:end], pa.string()),
                    pa.array([TASK] * n, pa.string()), pa.array([""] * n, pa.string()), pa.array(["{}"] * n, pa.string()),
                    pa.array([None] * n, schemas.TS), pa.FixedSizeListArray.from_arrays(pa.array(vectors[start:end].reshape(-1)), DIM),
                    pa.array([ENCODER] * n, pa.string()),
                ], schema=schema)  # fmt: skip

        reader = pa.RecordBatchReader.from_batches(schema, batches())
        if behaviors is None:
            behaviors = db.create_table("behaviors", schema=schema)
        # the same operation as persona's: an upsert on the item key (re-ingesting updates, never duplicates)
        behaviors.merge_insert(schemas.BEHAVIOR_KEY).when_matched_update_all().when_not_matched_insert_all().execute(reader)
        ids = [str(u) for u in range(first, first + count)]
        rows = pa.table({
            "user_id": ids, "n_items": [args.items] * count, "n_queries": [0] * count, "first_ts": pa.nulls(count, schemas.TS),
            "last_ts": pa.nulls(count, schemas.TS), "profile": pa.nulls(count, pa.string()), "metadata": ["{}"] * count,
        }, schema=schemas.USERS)  # fmt: skip
        if users_table is None:
            users_table = db.create_table("users", schema=schemas.USERS)
        users_table.merge_insert(schemas.USER_KEY).when_matched_update_all().when_not_matched_insert_all().execute(rows)
        seconds += time.perf_counter() - started
    return {"write_s": seconds}


def raw_read(path: Path, args: argparse.Namespace) -> dict:
    import lancedb
    import pyarrow as pa
    import pyarrow.compute as pc
    from lancedb.index import BTree

    db = lancedb.connect(str(path))
    behaviors, users_table = db.open_table("behaviors"), db.open_table("users")
    started = time.perf_counter()
    behaviors.create_index("user_id", config=BTree())
    result = {"index_s": time.perf_counter() - started, "indexes": ["behaviors.user_id btree"]}
    rng = np.random.default_rng(args.seed + 1)
    users = [str(u) for u in rng.integers(0, args.users, args.searches)]
    queries = rng.standard_normal((args.searches, DIM), dtype=np.float32)

    def search(user: str, query: np.ndarray) -> int:
        where = f"user_id = '{user}' AND task = '{TASK}'"
        return behaviors.search(query, vector_column_name="vector").metric("cosine").where(where, prefilter=True).limit(5).to_arrow().num_rows

    search(users[0], queries[0])
    latencies, found = [], 0
    for user, query in zip(users, queries):
        begun = time.perf_counter()
        found += search(user, query)
        latencies.append(time.perf_counter() - begun)
    result.update(_latency(latencies), hits_per_search=found / len(users))
    for name, offset in (("list_first_page_s", 0), ("list_middle_page_s", args.users // 2)):
        begun = time.perf_counter()  # the same operation as persona's: a page of users in id order
        ids = users_table.search().select(["user_id"]).limit(None).to_arrow().column("user_id")
        page_ids = ids.take(pc.sort_indices(pc.cast(ids, pa.int64()))[offset : offset + 50]).to_pylist()
        page = users_table.search().where(f"user_id IN ({', '.join(repr(u) for u in page_ids)})").limit(None).to_arrow()
        result[name] = time.perf_counter() - begun
        result[name.replace("_s", "_rows")] = page.num_rows
        begun = time.perf_counter()  # what LanceDB gives without an order: a page in storage order
        users_table.search().offset(offset).limit(50).to_arrow()
        result[name.replace("_s", "_storage_order_s")] = time.perf_counter() - begun
    return result


def _latency(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"search_p50_ms": float(np.percentile(ms, 50)), "search_p99_ms": float(np.percentile(ms, 99))}


# ---------- the driver ----------

SIDES = {"persona": (persona_write, persona_read), "raw": (raw_write, raw_read)}


def run_side(side: str, phase: str, path: Path, args: argparse.Namespace) -> dict:
    """One side's phase in its own process: its own peak memory, nothing cached from the other side."""
    command = [sys.executable, __file__, "--side", side, "--phase", phase, "--path", str(path), "--users", str(args.users),
               "--items", str(args.items), "--chunk", str(args.chunk), "--searches", str(args.searches), "--seed", str(args.seed)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} {phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10, help="history items per user")
    parser.add_argument("--chunk", type=int, default=50_000, help="users per write (one persona transaction each)")
    parser.add_argument("--searches", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/persona-scale"), help="where the two stores are written (removed after)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/scale/results-USERS.json")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["write", "read"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: one phase of one side
        write, read = SIDES[args.side]
        result = (write if args.phase == "write" else read)(args.path, args)
        print(json.dumps({**result, "peak_mib": peak_mib()}))
        return

    started = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    sides: dict[str, dict] = {}
    for side in SIDES:
        path = args.work / side
        wrote = run_side(side, "write", path, args)
        size = disk_bytes(path)
        read = run_side(side, "read", path, args)
        items = args.users * args.items
        sides[side] = {
            "write_s": round(wrote["write_s"], 2), "items_per_s": round(items / wrote["write_s"]), "write_peak_mib": round(wrote["peak_mib"]),
            "store_mib": round(size / 2**20, 1), "index_s": round(read["index_s"], 2), "indexes": read["indexes"],
            "search_p50_ms": round(read["search_p50_ms"], 2), "search_p99_ms": round(read["search_p99_ms"], 2),
            "hits_per_search": read["hits_per_search"], "list_first_page_s": round(read["list_first_page_s"], 4),
            "list_middle_page_s": round(read["list_middle_page_s"], 4), "read_peak_mib": round(read["peak_mib"]),
            **{k: round(v, 4) for k, v in read.items() if k.endswith("storage_order_s")},
        }  # fmt: skip
        print(side, json.dumps(sides[side]), flush=True)
        shutil.rmtree(path, ignore_errors=True)
    p, r = sides["persona"], sides["raw"]
    ratios = {  # persona relative to raw: 1.0 is parity, above is better for persona
        "write throughput": p["items_per_s"] / r["items_per_s"],
        "search p50": r["search_p50_ms"] / p["search_p50_ms"], "search p99": r["search_p99_ms"] / p["search_p99_ms"],
        "list first page": r["list_first_page_s"] / p["list_first_page_s"], "list middle page": r["list_middle_page_s"] / p["list_middle_page_s"],
        "store size": r["store_mib"] / p["store_mib"],
    }  # fmt: skip
    results = {
        "users": args.users, "items": args.users * args.items, "dim": DIM, "chunk_users": args.chunk, "searches": args.searches,
        "sides": sides, "persona_over_raw": {k: round(v, 3) for k, v in ratios.items()},
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()}, "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    out = args.out or Path(__file__).with_name(f"results-{args.users}.json")
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results["persona_over_raw"], indent=2))
    print(f"written {out} in {results['wall_s']} s")


if __name__ == "__main__":
    main()
