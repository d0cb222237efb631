"""Benchmark: Per-Pcs assembly against OPPU training, per target user, in one run on the same users.

For the same N test users of a store that already holds a task base and a piece pool (see the
README section): OPPU trains one LoRA per user from scratch on the examples the pool's assembly
reads (its pairs recipe; timed per user, its adapter bytes counted) and Per-Pcs assembles each user's adapter from the pool (timed per user, its stored
bytes counted); then both are evaluated on those users' queries with the same batched path.
Goals (issue 5): assembly at least 20x faster, storage at least 1000x smaller, quality at
least 99% of OPPU's (ROUGE-1 for generation tasks). With `--max-items N ...` the same users are
also assembled from their N most recent items only, in the same run: seconds, quality, and how
far the choices agree with the full history's (the share of modules that pick the same pieces,
and the weight both assign alike). With `--text` each user is also assembled from their items read
as plain text (`assemble --history-format text`: no instruction, no synthesized input), whole and at
each N, compared with the full task-format history the same way.

    .venv/bin/python benchmarks/perpcs_vs_oppu/run.py --store STORE [--task LaMP-7] [--users 32]
        [--pool TAG] [--top-k 3] [--max-items N ...] [--text] [--out benchmarks/perpcs_vs_oppu/results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a store with the task's users, its task LoRA base and a piece pool")
    parser.add_argument("--task", default="LaMP-7")
    parser.add_argument("--users", type=int, default=32, help="the first N test-split users")
    parser.add_argument("--pool", default=None, help="pool tag or version (default: the newest)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--max-items", type=int, nargs="+", default=[],
                        help="also assemble from each user's N most recent items, for each N (the full history always runs)")
    parser.add_argument("--text", action="store_true", help="also assemble from the items read as plain text (whole history and each --max-items)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()

    from recipes.methods.oppu import train_oppu
    from recipes.methods.perpcs.assembly import assemble_users
    from recipes.kit.backbones import load_llm
    from recipes.flows.evaluate import EvalRequest, evaluate
    from recipes.kit.training_loop import LoraSettings

    store, task, users, pool = opened(args)
    group = "bench-oppu-" + task.name
    print(f"{len(users)} {task.name} test users; pool {', '.join(pool.tags) or pool.label} (version {pool.version}, {len(pool.sharers)} sharers) on base {pool.base}")

    # OPPU: the paper's settings and the CLI's defaults, trained again so the time is measured now, on
    # the examples assembly reads (the pool's pairs: plain history items, or task-format pairs of them)
    oppu = train_oppu(store, load_llm(None, args.device), task, users, LoraSettings(learning_rate=1e-3, batch_size=4, epochs=2.0),
                      group, pool.base, retrain=True, pairs=pool.pairs)  # fmt: skip

    def quality(method: str, **extra) -> dict:
        request = EvalRequest(task=task.name, method=method, split="test", users=users, **extra)
        run, _ = evaluate(store, request, lambda: load_llm(None, args.device))
        return {"run_id": run.run_id, "method": run.method, **run.metrics, "examples_per_s": run.examples_per_s}

    def assembled(max_items: int | None, history_format: str = "task") -> tuple:
        """Assemble every user (stored, replacing the last assembly) and evaluate it right away."""
        report = assemble_users(store, llm, task, users, args.top_k, str(pool.version), max_items=max_items, history_format=history_format)
        return report, quality("perpcs", pool=str(pool.version))

    llm = load_llm(None, args.device)
    # the other readings first, the full task-format history last: the store keeps its assemblies
    formats = ["task", "text"] if args.text else ["task"]
    variants = [(f, n) for f in formats for n in [*sorted(set(args.max_items), reverse=True), None] if (f, n) != ("task", None)]
    other = {variant: assembled(variant[1], variant[0]) for variant in variants}
    assembly, perpcs = assembled(None)
    runs = {
        "oppu": quality("oppu", plugin=group),
        "perpcs": perpcs,
        "task-lora (base)": quality("task-lora", plugin=pool.base) if pool.base else None,
    }
    oppu_s = statistics.fmean(oppu.train_seconds)
    assembly_s = statistics.fmean(assembly.seconds.values())
    oppu_bytes = statistics.fmean(oppu.adapter_bytes)
    stored = statistics.fmean(assembly.stored_bytes.values())
    metric = task.metric_names[0]
    ratio = runs["perpcs"][metric] / runs["oppu"][metric] if task.higher_is_better(metric) else runs["oppu"][metric] / runs["perpcs"][metric]
    results = {
        "task": task.name, "store": str(args.store), "users": len(users), "pool": pool.label, "pool_tags": pool.tags, "pool_version": pool.version,
        "sharers": len(pool.sharers), "pairs": pool.pairs, "top_k": args.top_k, "base": pool.base,
        "per_user": {
            "oppu_train_seconds": round(oppu_s, 3), "assembly_seconds": round(assembly_s, 3),
            "speedup": round(oppu_s / assembly_s, 1), "oppu_adapter_bytes": round(oppu_bytes),
            "assembly_stored_bytes": round(stored), "storage_ratio": round(oppu_bytes / stored, 1),
        },
        "quality": {k: v for k, v in runs.items() if v}, "quality_ratio": round(ratio, 4),
        "other_readings": [
            {"history_format": f, "max_items": n, "assembly_seconds": round(statistics.fmean(report.seconds.values()), 3),
             "speedup": round(oppu_s / statistics.fmean(report.seconds.values()), 1),
             **choice_agreement(assembly.assembled, report.assembled), "quality": row}
            for (f, n), (report, row) in other.items()
        ],
        "goals": {"speedup >= 20": oppu_s / assembly_s >= 20, "storage_ratio >= 1000": oppu_bytes / stored >= 1000,
                  "quality >= 0.99 of OPPU": ratio >= 0.99},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    _print(results, metric)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def opened(args: argparse.Namespace) -> tuple:
    """The store, task, first N test-split users and pool version the arguments name."""
    from recipes.kit.splits import split_users
    from recipes.kit.tasks import get_task
    from recipes.methods.perpcs.pool import load_pool
    from store import Store

    store = Store(args.store)
    task = get_task(args.task)
    return store, task, split_users(store, task, "test")[: args.users], load_pool(store, task.name, args.pool)


def choice_agreement(full: dict, other: dict) -> dict:
    """How far `other`'s choices match `full`'s, over every user and module: the share that picks
    the same set of pieces, and the weight both give alike (sum of the smaller weight per piece)."""
    same, overlap, modules = 0, 0.0, 0
    for user, choices in full.items():
        for path, picked in choices.items():
            mine, theirs = dict(picked), dict(other[user][path])
            same += set(mine) == set(theirs)
            overlap += sum(min(w, theirs.get(s, 0.0)) for s, w in mine.items())
            modules += 1
    return {"same_pieces": round(same / modules, 4), "weight_overlap": round(overlap / modules, 4)}


def _print(results: dict, metric: str) -> None:
    per = results["per_user"]
    print(f"\nper target user ({results['users']} users, means)   OPPU (train)      Per-Pcs (assemble)   ratio")
    print(f"  seconds                               {per['oppu_train_seconds']:>12.3f}   {per['assembly_seconds']:>12.3f}   {per['speedup']:>8.1f}x")
    print(f"  stored bytes                          {per['oppu_adapter_bytes']:>12,d}   {per['assembly_stored_bytes']:>12,d}   {per['storage_ratio']:>8.1f}x")
    print("\nquality on their queries")
    for name, row in results["quality"].items():
        scores = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("run_id", "method", "examples_per_s"))
        print(f"  {name:<18} {scores}  ({row['examples_per_s']} examples/s, run {row['run_id']})")
    print(f"  Per-Pcs / OPPU {metric}: {results['quality_ratio']:.4f}")
    for row in results["other_readings"]:
        items = "all items" if row["max_items"] is None else f"the {row['max_items']} most recent items"
        print(f"\nPer-Pcs from {items} read as {row['history_format']}: {row['assembly_seconds']:.3f} s per user "
              f"({row['speedup']:.1f}x), same pieces as the full history in {row['same_pieces']:.1%} of modules "
              f"(weight overlap {row['weight_overlap']:.3f}), {metric} {row['quality'][metric]:.4f}")
    print("\ngoals: " + ", ".join(f"{goal}: {'met' if ok else 'NOT met'}" for goal, ok in results["goals"].items()))


if __name__ == "__main__":
    main()
