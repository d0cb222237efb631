"""Benchmark: the store layer at scale, persona against raw LanceDB doing the same work on the same data.

A synthetic store of --users users with --items history items each (vectors generated, normalized,
not encoded, so the store is what is measured; made one batch at a time, untimed, so neither side's
peak memory holds more than one batch of them) is written twice, each side in its own process
(so peak memory is that side's), --chunk users per write: through persona's Store (transaction,
upsert of the items, user statistics recounted, indexes kept up to date) and straight into LanceDB
tables of the same schema with the same upserts (merge_insert on the same keys; the user rows are
written as given), the raw side then making its scalar index on user ids, so both writes end with
an indexed table (persona's keep theirs up to date) and both read phases start with cold caches.
Generating the data is not timed. Then, per side: per-user top-k vector search latency p50/p99 over
--searches random users, and user listing (a page of 50 users in id order at the start and in the
middle, the median of 5; raw LanceDB keeps no order, so its side sorts the ids with Arrow and fetches the page, and
its page in storage order is reported beside). Then a piece pool of --sharers sharers (random
rank-8 pieces with gates for every attention projection of a 4-layer random Llama of SmolLM2's
width, 576) is written as one pool version, and one target user (20 history examples) is
assembled from it: the pool version read and stacked, the target's history run through the
model with every module's top-3 pieces chosen by gate, the record written; the raw side reads the
same table version with LanceDB, stacks it and assembles with the same code, then writes the same
record with merge_insert. Each
figure is reported for both sides with the persona/raw ratio (throughput: persona/raw; times:
raw/persona, so 1.0 is parity and higher is better for persona either way). The store
measurement runs --rounds times and the pool's --pool-rounds times, the sides alternating (and
which goes first), from fresh stores each time; each figure is the median over the rounds, each
peak memory the largest: this machine's speed drifts between processes by 10-20% (a pool read of
the same data in fresh processes: 2.7-3.3 s on either side), more than some differences measured.

    .venv/bin/python benchmarks/scale/run.py [--users 100000] [--items 10] [--sharers 1000] [--rounds 3] [--pool-rounds 7] [--out FILE]
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


BATCH = 8192
LISTINGS = 5
"""Each listing is timed this many times; its median is reported (one timing moved by 10-20%)."""


class Generated:
    """The synthetic items of `users` users from first_user on, in batches of BATCH items made on
    demand (seeded per batch, the same for both sides), so only one batch is ever in memory and
    peak memory is the store's, not the benchmark's; `seconds` is the time spent making them,
    which each side subtracts from its write time."""

    def __init__(self, first_user: int, users: int, items: int, seed: int) -> None:
        self.first_user, self.total, self.items, self.seed = first_user, users * items, items, seed
        self.seconds = 0.0

    def __iter__(self):
        for start in range(0, self.total, BATCH):
            began = time.perf_counter()
            rng = np.random.default_rng([self.seed, self.first_user, start])
            count = min(BATCH, self.total - start)
            vectors = rng.standard_normal((count, DIM), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            rows = range(start, start + count)
            user_ids = [str(self.first_user + n // self.items) for n in rows]
            item_ids = [f"{self.first_user + n // self.items}-{n % self.items}" for n in rows]
            self.seconds += time.perf_counter() - began
            yield user_ids, item_ids, vectors


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float | None:
    """Resident memory now (Linux), traced after every write: a peak that stops rising while the
    table keeps growing is bounded; one rising with every write is not."""
    try:
        with open("/proc/self/status") as status:
            return next(round(int(line.split()[1]) / 1024) for line in status if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return None


# ---------- persona's side ----------


def persona_write(path: Path, args: argparse.Namespace) -> dict:
    from store import BehaviorBatch, Store

    store = Store(str(path))
    seconds, trace = 0.0, []
    for first in range(0, args.users, args.chunk):
        count = min(args.chunk, args.users - first)
        generated = Generated(first, count, args.items, args.seed)
        started = time.perf_counter()  # generating the data is not timed; making persona's batches is

        def batches():
            for user_ids, item_ids, vectors in generated:
                yield BehaviorBatch(item_ids, user_ids, [TASK] * len(item_ids), [""] * len(item_ids), vectors)

        store.ingest(batches(), [], {str(u): {} for u in range(first, first + count)}, ENCODER, DIM)
        seconds += time.perf_counter() - started - generated.seconds
        trace.append(rss_mib())
    return {"write_s": seconds, "rss_after_each_write_mib": trace}


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
        seconds = []
        for _ in range(LISTINGS):
            begun = time.perf_counter()
            page = store.list_users(limit=50, offset=offset)
            seconds.append(time.perf_counter() - begun)
        result[name] = float(np.median(seconds))
        result[name.replace("_s", "_rows")] = len(page)
    return result


# ---------- raw LanceDB's side ----------


def raw_write(path: Path, args: argparse.Namespace) -> dict:
    import lancedb
    import pyarrow as pa
    from lancedb.index import BTree

    from store import schemas

    db = lancedb.connect(str(path))
    schema = schemas.behaviors(DIM)
    behaviors = users_table = None
    seconds, trace = 0.0, []
    for first in range(0, args.users, args.chunk):
        count = min(args.chunk, args.users - first)
        generated = Generated(first, count, args.items, args.seed)
        started = time.perf_counter()

        def batches():
            for user_ids, item_ids, vectors in generated:
                n = len(user_ids)
                yield pa.RecordBatch.from_arrays([
                    pa.array(item_ids, pa.string()), pa.array(user_ids, pa.string()),
                    pa.array([TASK] * n, pa.string()), pa.array([""] * n, pa.string()), pa.array(["{}"] * n, pa.string()),
                    pa.array([None] * n, schemas.TS), pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
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
        seconds += time.perf_counter() - started - generated.seconds
        trace.append(rss_mib())
    started = time.perf_counter()  # like persona's writes, the write phase leaves the table indexed (and both reads start cold)
    behaviors.create_index("user_id", config=BTree())
    index_s = time.perf_counter() - started
    return {"write_s": seconds + index_s, "index_s": index_s, "rss_after_each_write_mib": trace}


def raw_read(path: Path, args: argparse.Namespace) -> dict:
    import lancedb
    import pyarrow as pa
    import pyarrow.compute as pc

    db = lancedb.connect(str(path))
    behaviors, users_table = db.open_table("behaviors"), db.open_table("users")
    result = {"indexes": [f"behaviors.{', '.join(i.columns)} {i.index_type.lower()}" for i in behaviors.list_indices()]}
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
        seconds = []
        for _ in range(LISTINGS):
            begun = time.perf_counter()  # the same operation as persona's: a page of users in id order
            ids = users_table.search().select(["user_id"]).limit(None).to_arrow().column("user_id")
            page_ids = ids.take(pc.sort_indices(pc.cast(ids, pa.int64()))[offset : offset + 50]).to_pylist()
            page = users_table.search().where(f"user_id IN ({', '.join(repr(u) for u in page_ids)})").limit(None).to_arrow()
            seconds.append(time.perf_counter() - begun)
        result[name] = float(np.median(seconds))
        result[name.replace("_s", "_rows")] = page.num_rows
        begun = time.perf_counter()  # what LanceDB gives without an order: a page in storage order
        users_table.search().offset(offset).limit(50).to_arrow()
        result[name.replace("_s", "_storage_order_s")] = time.perf_counter() - begun
    return result


# ---------- a pool of sharers and one assembly (both sides) ----------

POOL_TASK = "LaMP-7"
POOL_LLM = "scale-llama-576"


def pool_llm():
    """A seeded random 4-layer Llama of SmolLM2-135M's width (576, 9 heads, 3 KV heads) with the
    embedded tokenizer: the pieces' shapes and the assembly's arithmetic of the real model's layers."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from recipes.kit.backbones import embedded_llm_cache, prepare_llm

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(embedded_llm_cache())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
        num_key_value_heads=3, pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return prepare_llm(POOL_LLM, LlamaForCausalLM(config).eval(), tokenizer, torch.device("cpu"))


def pool_pieces(llm, sharers: int, seed: int) -> list:
    """Every sharer's rank-8 (A, B, gate) for every attention projection, seeded."""
    import torch

    from recipes.methods.perpcs.pool import layer_of, piece_tensors
    from store import Piece

    generator = torch.Generator().manual_seed(seed)
    modules = {n: m for n, m in llm.model.named_modules() if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")}
    pieces = []
    for sharer in range(sharers):
        for name, module in modules.items():
            a = torch.randn(8, module.in_features, generator=generator) * 0.01
            b = torch.randn(module.out_features, 8, generator=generator) * 0.01
            gate = torch.randn(module.in_features, generator=generator)
            pieces.append(Piece(POOL_TASK, f"s{sharer}", name, 8, 8.0, POOL_LLM, piece_tensors(a, b, gate), 1, layer_of(name)))
    return pieces


def target_examples() -> list:
    from recipes.kit.training_loop import Example

    words = "the team worked on their defense all season before the parade went through the center of town".split()
    return [Example(None, " ".join(words[(n * 3) % len(words):] + words[: (n * 3) % len(words)])) for n in range(20)]


def persona_pool(path: Path, args: argparse.Namespace) -> dict:
    from store import Store

    llm = pool_llm()
    pieces = pool_pieces(llm, args.sharers, args.seed)
    started = time.perf_counter()
    Store(str(path)).add_pool_version(pieces, ["pool-1"])
    return {"write_s": time.perf_counter() - started, "pieces": len(pieces), "piece_bytes": sum(len(p.tensors) for p in pieces)}


def persona_assemble(path: Path, args: argparse.Namespace) -> dict:
    from recipes.methods.perpcs.assembly import assemble_user
    from recipes.methods.perpcs.pool import encode_choices, load_pool
    from store import AssemblyRecord, Store

    llm, examples = pool_llm(), target_examples()
    started = time.perf_counter()
    store = Store(str(path))
    pool = load_pool(store, POOL_TASK, "pool-1")
    read = time.perf_counter()
    choices = assemble_user(llm, pool, examples, top_k=3, precision="float32")
    scored = time.perf_counter()
    store.put_assemblies([AssemblyRecord(POOL_TASK, "target", pool.version, 3, llm.id, encode_choices(pool, choices, 3))])
    done = time.perf_counter()
    return {"read_s": read - started, "assemble_s": scored - read, "record_s": done - scored, "total_s": done - started,
            "choices": {m: c for m, c in sorted(choices.items())[:2]}}  # fmt: skip


def raw_pool(path: Path, args: argparse.Namespace) -> dict:
    import json as json_
    from datetime import datetime, timezone

    import lancedb
    import pyarrow as pa

    from store import schemas

    llm = pool_llm()
    pieces = pool_pieces(llm, args.sharers, args.seed)
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    rows = [{**{k: v for k, v in p.__dict__.items() if k != "size"}, "config": json_.dumps(p.config), "metrics": json_.dumps(p.metrics), "created_at": now} for p in pieces]
    table = lancedb.connect(str(path)).create_table("pieces", schema=schemas.PIECES)
    table.merge_insert(schemas.PIECE_KEY).when_matched_update_all().when_not_matched_insert_all().execute(pa.Table.from_pylist(rows, schema=schemas.PIECES))
    table.tags.create("pool-1", table.version)
    return {"write_s": time.perf_counter() - started, "pieces": len(pieces), "piece_bytes": sum(len(p.tensors) for p in pieces)}


def raw_assemble(path: Path, args: argparse.Namespace) -> dict:
    import json as json_

    import lancedb
    import pyarrow as pa

    from recipes.methods.perpcs.assembly import assemble_user
    from recipes.methods.perpcs.pool import encode_choices, pool_from_pieces
    from store import Piece, PoolVersion, schemas

    llm, examples = pool_llm(), target_examples()
    started = time.perf_counter()
    db = lancedb.connect(str(path))
    table = db.open_table("pieces")
    version = int(table.tags.list()["pool-1"]["version"])
    table.checkout(version)
    rows = table.search().where(f"task = '{POOL_TASK}'").limit(None).to_arrow().to_pylist()
    pieces = [Piece(**{**row, "config": json_.loads(row["config"]), "metrics": json_.loads(row["metrics"])}) for row in rows]
    pool = pool_from_pieces(POOL_TASK, PoolVersion(version, ["pool-1"]), pieces)
    read = time.perf_counter()
    choices = assemble_user(llm, pool, examples, top_k=3, precision="float32")
    scored = time.perf_counter()
    record = {"task": POOL_TASK, "user_id": "target", "pool_version": version, "top_k": 3, "llm": llm.id,
              "choice": encode_choices(pool, choices, 3), "base": None, "config": "{}", "seconds": None, "created_at": None}  # fmt: skip
    assemblies = db.create_table("assemblies", schema=schemas.ASSEMBLIES)
    assemblies.merge_insert(schemas.ASSEMBLY_KEY).when_matched_update_all().when_not_matched_insert_all().execute(
        pa.Table.from_pylist([record], schema=schemas.ASSEMBLIES)
    )
    done = time.perf_counter()
    return {"read_s": read - started, "assemble_s": scored - read, "record_s": done - scored, "total_s": done - started,
            "choices": {m: c for m, c in sorted(choices.items())[:2]}}  # fmt: skip


def _latency(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"search_p50_ms": float(np.percentile(ms, 50)), "search_p99_ms": float(np.percentile(ms, 99))}


# ---------- the driver ----------

SIDES = {"persona": (persona_write, persona_read), "raw": (raw_write, raw_read)}
POOL_SIDES = {"persona": (persona_pool, persona_assemble), "raw": (raw_pool, raw_assemble)}


def run_side(side: str, phase: str, path: Path, args: argparse.Namespace) -> dict:
    """One side's phase in its own process: its own peak memory, nothing cached from the other side."""
    command = [sys.executable, __file__, "--side", side, "--phase", phase, "--path", str(path), "--users", str(args.users),
               "--items", str(args.items), "--chunk", str(args.chunk), "--searches", str(args.searches), "--seed", str(args.seed),
               "--sharers", str(args.sharers)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} {phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure_store(side: str, args: argparse.Namespace) -> dict:
    """One side's store figures from a fresh store: write, then read."""
    path = args.work / side
    wrote = run_side(side, "write", path, args)
    size = disk_bytes(path)
    read = run_side(side, "read", path, args)
    items = args.users * args.items
    figures = {
        "write_s": round(wrote["write_s"], 2), "items_per_s": round(items / wrote["write_s"]), "write_peak_mib": round(wrote["peak_mib"]),
        "rss_after_each_write_mib": wrote["rss_after_each_write_mib"],
        "store_mib": round(size / 2**20, 1), "index_s": round(wrote.get("index_s", 0.0) + read.get("index_s", 0.0), 2), "indexes": read["indexes"],
        "search_p50_ms": round(read["search_p50_ms"], 2), "search_p99_ms": round(read["search_p99_ms"], 2),
        "hits_per_search": read["hits_per_search"], "list_first_page_s": round(read["list_first_page_s"], 4),
        "list_middle_page_s": round(read["list_middle_page_s"], 4), "read_peak_mib": round(read["peak_mib"]),
        **{k: round(v, 4) for k, v in read.items() if k.endswith("storage_order_s")},
    }  # fmt: skip
    shutil.rmtree(path, ignore_errors=True)
    return figures


def measure_pool(side: str, args: argparse.Namespace) -> dict:
    """One side's pool figures from a fresh pool: its write, then one target's assembly."""
    pool_path = args.work / f"{side}-pool"
    wrote = run_side(side, "pool", pool_path, args)
    assembled = run_side(side, "assemble", pool_path, args)
    figures = {
        "sharers": args.sharers, "pieces": wrote["pieces"], "piece_mib": round(wrote["piece_bytes"] / 2**20, 1),
        "write_s": round(wrote["write_s"], 2), "store_mib": round(disk_bytes(pool_path) / 2**20, 1),
        **{k: round(v, 3) for k, v in assembled.items() if k.endswith("_s")}, "assemble_peak_mib": round(assembled["peak_mib"]),
        "choices": assembled["choices"],
    }  # fmt: skip
    shutil.rmtree(pool_path, ignore_errors=True)
    return figures


def alternating(measure, rounds: int, args: argparse.Namespace, label: str) -> dict[str, dict]:
    """Each side measured `rounds` times, the sides alternating (and which goes first: this
    machine drifts between processes), summarized by median_side."""
    measured: dict[str, list[dict]] = {side: [] for side in SIDES}
    for round_ in range(rounds):
        for side in list(SIDES)[:: 1 if round_ % 2 == 0 else -1]:
            measured[side].append(measure(side, args))
            print(side, label, f"round {round_ + 1}", json.dumps(measured[side][-1]), flush=True)
    return {side: median_side(found) for side, found in measured.items()}


def median_side(rounds: list[dict]) -> dict:
    """A side's figures over its rounds: the median of each figure, the largest of each peak
    memory; every round's figures are kept beside them as measured."""

    def merge(key: str, values: list):
        first = values[0]
        if isinstance(first, dict):
            return {k: merge(k, [v[k] for v in values]) for k in first}
        if isinstance(first, bool) or not isinstance(first, (int, float)):
            return first
        return max(values) if key.endswith("peak_mib") else round(float(np.median(values)), 4)

    return {**merge("", rounds), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10, help="history items per user")
    parser.add_argument("--chunk", type=int, default=50_000, help="users per write (one persona transaction each)")
    parser.add_argument("--searches", type=int, default=1000)
    parser.add_argument("--sharers", type=int, default=1000, help="sharers in the piece pool one target is assembled from (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="times each side's store is measured, alternating; medians are reported")
    parser.add_argument("--pool-rounds", type=int, default=7, help="the same for the pool (a few seconds each, and noisier)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/persona-scale"), help="where the two stores are written (removed after)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/scale/results-USERS.json")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["write", "read", "pool", "assemble"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: one phase of one side
        phases = dict(zip(("write", "read"), SIDES[args.side])) | dict(zip(("pool", "assemble"), POOL_SIDES[args.side]))
        result = phases[args.phase](args.path, args)
        print(json.dumps({**result, "peak_mib": peak_mib()}))
        return

    started = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    sides = alternating(measure_store, args.rounds, args, "store")
    if args.sharers:
        pools = alternating(measure_pool, args.pool_rounds, args, "pool")
        for side, figures in pools.items():
            sides[side]["pool"] = figures
    p, r = sides["persona"], sides["raw"]
    ratios = {  # persona relative to raw: 1.0 is parity, above is better for persona
        "write throughput": p["items_per_s"] / r["items_per_s"],
        "search p50": r["search_p50_ms"] / p["search_p50_ms"], "search p99": r["search_p99_ms"] / p["search_p99_ms"],
        "list first page": r["list_first_page_s"] / p["list_first_page_s"], "list middle page": r["list_middle_page_s"] / p["list_middle_page_s"],
        "store size": r["store_mib"] / p["store_mib"],
    }  # fmt: skip
    if args.sharers:
        pp, rp = p["pool"], r["pool"]
        assert pp["choices"] == rp["choices"], "the two sides assembled different adapters"
        ratios.update({
            "pool write": rp["write_s"] / pp["write_s"], "pool read": rp["read_s"] / pp["read_s"],
            "assembly of one target (read, assemble, record)": rp["total_s"] / pp["total_s"],
        })  # fmt: skip
    results = {
        "users": args.users, "items": args.users * args.items, "dim": DIM, "chunk_users": args.chunk, "searches": args.searches,
        "sharers": args.sharers,
        "rounds": args.rounds, "pool_rounds": args.pool_rounds if args.sharers else 0, "sides": sides, "persona_over_raw": {k: round(v, 3) for k, v in ratios.items()},
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()}, "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    out = args.out or Path(__file__).with_name(f"results-{args.users}.json")
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results["persona_over_raw"], indent=2))
    print(f"written {out} in {results['wall_s']} s")


if __name__ == "__main__":
    main()
