"""How alike to the input a retrieved item must be to be worth showing: `rag --min-similarity`.

For every training- and dev-split query of a LaMP store (never the test split), the item BM25
ranks first in the user's own history and in a donor's (a seeded derangement, as `--ablation`
draws), its cosine with the input by the store's encoder, and how much of the user's gold answer
it holds (ROUGE-1 against the gold). For each threshold: how often the own item passes, what it
holds of the gold when it does, and how often a donor's item passes. No LLM runs.

    python benchmarks/lamp/similarity.py --store .persona-bench/lamp7 [--task LaMP-7]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def top_items(task, queries, histories, donor_of, encoder) -> list[dict]:
    """Per query: BM25's first own and donor item, each with its cosine to the input and ROUGE-1 to the gold."""
    from rouge_score import rouge_scorer

    from recipes.kit.retrieval import bm25_items, input_vectors

    scorer = rouge_scorer.RougeScorer(["rouge1"])
    vectors = input_vectors(encoder, task, [q.input for q in queries])
    rows = []
    for query, vector in zip(queries, vectors):
        row = {}
        for side, user in (("own", query.user_id), ("donor", donor_of[query.user_id])):
            [item] = bm25_items(task, query.input, histories[user], 1)
            row[side] = {
                "cosine": float(np.dot(item.vector, vector)),
                "gold_rouge1": scorer.score(query.output, item.text)["rouge1"].fmeasure,
            }
        rows.append(row)
    return rows


def by_threshold(rows: list[dict]) -> list[dict]:
    table = []
    for threshold in THRESHOLDS:
        own = [r["own"] for r in rows if r["own"]["cosine"] >= threshold]
        donor = [r["donor"] for r in rows if r["donor"]["cosine"] >= threshold]
        table.append({
            "threshold": threshold,
            "own_pass": round(len(own) / len(rows), 3),
            "own_gold_rouge1_when_shown": round(float(np.mean([o["gold_rouge1"] for o in own])), 3) if own else None,
            "donor_pass": round(len(donor) / len(rows), 3),
        })  # fmt: skip
    return table


def main() -> None:
    from recipes.kit.backbones import load_encoder
    from recipes.kit.retrieval import donors
    from recipes.kit.splits import query_split
    from recipes.kit.tasks import get_task
    from store import Store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--task", default="LaMP-7")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/lamp/similarity-TASK.json")
    args = parser.parse_args()
    store, task = Store(str(args.store)), get_task(args.task)
    queries = [q for q in store.task_queries(task.name) if q.output and query_split(q.split, q.user_id) in ("train", "dev")]
    histories = store.histories(sorted({q.user_id for q in queries}), task.name, with_vectors=True)
    queries = [q for q in queries if histories.get(q.user_id)]
    donor_of = donors(sorted(histories), args.seed, "rag")
    encoder = load_encoder((store.encoder() or (None,))[0])
    rows = top_items(task, queries, histories, donor_of, encoder)
    result = {"task": task.name, "store": str(args.store), "queries": len(rows), "splits": ["train", "dev"], "encoder": encoder.id,
              "thresholds": by_threshold(rows)}  # fmt: skip
    out = args.out or Path(__file__).with_name(f"similarity-{task.name.lower()}.json")
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"{task.name}: {len(rows)} train and dev queries; BM25's first item, own history vs a donor's")
    print("| cosine >= | own item shown | its ROUGE-1 to the gold | donor item shown |")
    print("|---|---|---|---|")
    for row in result["thresholds"]:
        print(f"| {row['threshold']} | {row['own_pass']:.1%} | {row['own_gold_rouge1_when_shown']} | {row['donor_pass']:.1%} |")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
