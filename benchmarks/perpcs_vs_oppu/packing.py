"""Benchmark: Per-Pcs assembly with history rows packed behind their shared prefix, against rows padded side by side.

Both read every example whole and compute the same thing (packing changes only how often the
shared chat turn and instruction are run); this measures the seconds per user of each, in
alternating rounds on the same users, and checks that they choose the same pieces.

    .venv/bin/python benchmarks/perpcs_vs_oppu/packing.py --store STORE [--pool TAG] [--task LaMP-7]
        [--users 16] [--rounds 2] [--out benchmarks/perpcs_vs_oppu/packing.json]
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
sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--task", default="LaMP-7")
    parser.add_argument("--pool", default=None)
    parser.add_argument("--users", type=int, default=16, help="the first N test-split users")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("packing.json"))
    args = parser.parse_args()

    from recipes.kit.backbones import load_llm
    from recipes.kit.training_loop import encode_example
    from recipes.methods.perpcs.assembly import assemble_user, assembly_examples, pool_llm
    from run import choice_agreement, opened

    store, task, users, pool = opened(args)
    llm = pool_llm(load_llm(None, "cpu"), store, pool)
    work = {user: examples for user, examples in assembly_examples(store, task, pool, users).items() if examples}

    def assemble_all(packed: bool) -> tuple[dict, list[float]]:
        choices, seconds = {}, []
        for user, examples in work.items():
            started = time.perf_counter()
            choices[user] = assemble_user(llm, pool, examples, args.top_k, 16, 256, "auto", pack=packed)
            seconds.append(time.perf_counter() - started)
        return choices, seconds

    rounds, chosen = [], {}
    for n in range(args.rounds):
        row = {}
        for packed in ((False, True) if n % 2 == 0 else (True, False)):  # alternate which goes first
            chosen[packed], seconds = assemble_all(packed)
            row["packed" if packed else "padded"] = round(statistics.fmean(seconds), 4)
        rounds.append(row)
        print(f"round {n + 1}: seconds per user, padded {row['padded']:.3f}, packed {row['packed']:.3f}")
    padded = statistics.median(r["padded"] for r in rounds)
    packed = statistics.median(r["packed"] for r in rounds)
    agreement = choice_agreement(chosen[False], chosen[True])
    results = {
        "task": task.name, "store": str(args.store), "pool": pool.label, "users": len(work), "top_k": args.top_k,
        "examples_per_user": round(statistics.fmean(len(e) for e in work.values()), 1),
        "tokens_per_user": round(statistics.fmean(sum(len(encode_example(llm, e, 256)[0]) for e in ex) for ex in work.values()), 1),
        "rounds": rounds, "median_seconds_per_user": {"padded": padded, "packed": packed},
        "speedup": round(padded / packed, 3), "packed_vs_padded_choices": agreement,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    print(f"packed {padded / packed:.2f}x faster; same pieces in {agreement['same_pieces']:.1%} of modules "
          f"(weight overlap {agreement['weight_overlap']:.4f})")  # fmt: skip
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
