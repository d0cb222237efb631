"""Benchmark: PPlug's personalized generation against non-personalized generation, and the cost of a
personal embedding against history length.

1. Throughput, in one run on the same N test queries, batch 16, greedy: the non-personalized
   k=0 prompts on the LLM (with the embedder's base merged in, if any) against the same prompts
   with each row's own soft tokens (mixed users in every batch). The personalized time includes
   reading the users' history vectors from the store and running the embedder. Two settings:
   "same shape", where every row generates exactly --tokens tokens (end tokens ignored), so both
   sides do the same decoding work; and "natural", where rows stop at their end token, so the
   answers' lengths differ too. Runs alternate and the median of --repeats is kept.
   Goal (issue 6): personalized at most 10% slower on the same shape.
2. Personal-embedding time per query against history length (synthetic unit vectors of the
   store's width, so every length is exactly that long), at batch 1 and batch 16.

    .venv/bin/python benchmarks/pplug/run.py --store STORE [--task LaMP-7] [--plugin pplug-LaMP-7]
        [--queries 64] [--repeats 3] [--out benchmarks/pplug/results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a store with the task's users and a trained PPlug embedder")
    parser.add_argument("--task", default="LaMP-7")
    parser.add_argument("--plugin", default=None, help="the embedder (default: pplug-TASK)")
    parser.add_argument("--queries", type=int, default=64, help="the first N test-split queries")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per row in the same-shape setting")
    parser.add_argument("--lengths", default="8,32,128,512", help="history lengths for the embedding timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()

    from recipes.kit.backbones import load_llm
    from recipes.flows.evaluate import select_queries
    import recipes.kit.generation as generation
    from recipes.kit.generation import generate
    from recipes.kit.row_edits import PerRow
    from recipes.kit.plugins import apply_chain, base_chain
    from recipes.methods.pplug.serving import get_pplug, load_embedder, soft_tokens
    from recipes.methods.pplug.training import history_vectors, pplug_name
    from recipes.kit.tasks import get_task
    from store import Store

    store = Store(args.store)
    task = get_task(args.task)
    plugin = get_pplug(store, args.plugin or pplug_name(task))
    queries = select_queries(store, task, "test", args.queries)
    llm = load_llm(plugin.llm, args.device)
    apply_chain(llm, base_chain(store, plugin.base))
    embedder = load_embedder(plugin, llm.device)
    prompts = [q.input for q in queries]
    texts = [task.query_text(q.input) for q in queries]
    users = len({q.user_id for q in queries})
    print(f"{len(queries)} {task.name} test queries of {users} users, batch {args.batch_size}; embedder {plugin.name} "
          f"({plugin.config['shape']['pooling']} pooling) on {plugin.base or 'the bare LLM'}; {args.device}, {torch.get_num_threads()} threads")  # fmt: skip

    def plain(max_new: int) -> list[str]:
        return generate(llm, prompts, max_new, args.batch_size)

    def personalized(max_new: int) -> list[str]:
        vectors = history_vectors(store, task, [q.user_id for q in queries], embedder.shape.history_cap)
        soft = soft_tokens(embedder, texts, [vectors[q.user_id] for q in queries])
        return generate(llm, prompts, max_new, args.batch_size, per_row=PerRow(soft=soft))

    stops = generation.stop_token_ids
    settings = {"same shape": args.tokens, "natural": task.max_new_tokens}
    throughput: dict[str, dict] = {}
    plain(4)  # warm-up: first-call allocations and kernels
    for setting, max_new in settings.items():
        generation.stop_token_ids = (lambda llm_: set()) if setting == "same shape" else stops
        timings: dict[str, list[float]] = {"non-personalized": [], "pplug": []}
        outputs: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for name, run in (("non-personalized", plain), ("pplug", personalized)):
                started = time.perf_counter()
                outputs[name] = run(max_new)
                timings[name].append(time.perf_counter() - started)
        rows = {}
        for name, seconds in timings.items():
            median = statistics.median(seconds)
            tokens = sum(len(llm.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs[name])
            rows[name] = {
                "seconds_median": round(median, 3), "seconds_all": [round(s, 3) for s in seconds],
                "examples_per_s": round(len(queries) / median, 3), "generated_tokens": tokens,
                "tokens_per_s": round(tokens / median, 2),
            }  # fmt: skip
        rows["pplug_slower_by"] = round(rows["pplug"]["seconds_median"] / rows["non-personalized"]["seconds_median"] - 1, 4)
        throughput[setting] = {"max_new_tokens": max_new, **rows}
    generation.stop_token_ids = stops
    slower = throughput["same shape"]["pplug_slower_by"]

    embedding = _embedding_times(embedder, texts, [int(n) for n in args.lengths.split(",")], store.encoder()[1])
    results = {
        "task": task.name, "store": str(args.store), "plugin": plugin.name, "pooling": plugin.config["shape"]["pooling"],
        "base": plugin.base, "queries": len(queries), "users": users, "batch_size": args.batch_size, "repeats": args.repeats,
        "throughput": throughput, "embedding_ms_per_query": embedding,
        "goals": {"personalized at most 10% slower (same shape, batch 16)": slower <= 0.10},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    _print(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


@torch.inference_mode()
def _embedding_times(embedder, texts: list[str], lengths: list[int], dim: int) -> list[dict]:
    """ms per query to make soft tokens from histories of exactly n items, at batch 1 and 16."""
    from recipes.methods.pplug.serving import soft_tokens

    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        history = rng.normal(size=(n, dim)).astype(np.float32)
        history /= np.linalg.norm(history, axis=1, keepdims=True)
        row = {"history_items": n}
        for batch in (1, 16):
            chosen = (texts * ((batch * 4) // max(1, len(texts)) + 1))[: batch * 4]
            soft_tokens(embedder, chosen[:batch], [history] * batch, batch)  # warm-up
            started = time.perf_counter()
            for start in range(0, len(chosen), batch):
                soft_tokens(embedder, chosen[start : start + batch], [history] * batch, batch)
            row[f"batch_{batch}_ms"] = round(1000 * (time.perf_counter() - started) / len(chosen), 3)
        rows.append(row)
    return rows


def _print(results: dict) -> None:
    for setting, rows in results["throughput"].items():
        print(f"\n{setting} (at most {rows['max_new_tokens']} new tokens), {results['queries']} queries, batch {results['batch_size']}"
              "      non-personalized        pplug")
        for key in ("seconds_median", "examples_per_s", "generated_tokens", "tokens_per_s"):
            print(f"  {key:<50} {rows['non-personalized'][key]:>14}   {rows['pplug'][key]:>10}")
        print(f"  pplug slower by {100 * rows['pplug_slower_by']:.1f}%")
    print("\npersonal embedding, ms per query")
    print("  history items    batch 1    batch 16")
    for row in results["embedding_ms_per_query"]:
        print(f"  {row['history_items']:>13}   {row['batch_1_ms']:>8}   {row['batch_16_ms']:>9}")
    print("\ngoals: " + ", ".join(f"{goal}: {'met' if ok else 'NOT met'}" for goal, ok in results["goals"].items()))


if __name__ == "__main__":
    main()
