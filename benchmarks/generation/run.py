"""Benchmark: batched greedy generation, examples/s at batch 1, 4 and 16 on the same LaMP-7 queries.

One process, one model load, the same prompts (LaMP-7 inputs, k=0, the task's 64 new tokens)
for every batch size, so only batching differs. Also counts how many answers are identical
to batch 1's (greedy; left padding may move a near-tie by float rounding).
Goal (issue 3): batch 16 at least 4x the examples/s of batch 1.

    .venv/bin/python benchmarks/generation/run.py [--questions ../shared/data/lamp7/questions.json]
        [--n 64] [--batch-sizes 1 4 16] [--out benchmarks/generation/results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEFAULT_QUESTIONS = ROOT.parent / "shared" / "data" / "lamp7" / "questions.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--n", type=int, default=64, help="queries (the first N of the file)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    if not args.questions.exists():
        sys.exit(f"{args.questions} not found: pass --questions path/to/lamp7/questions.json")

    from recipes.kit.backbones import load_llm
    from recipes.kit.generation import generate
    from recipes.kit.tasks import get_task

    task = get_task("LaMP-7")
    prompts = [q["input"] for q in json.loads(args.questions.read_text())[: args.n]]
    llm = load_llm(None, device=args.device)
    generate(llm, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up
    rows, reference = [], None
    for batch_size in args.batch_sizes:
        started = time.perf_counter()
        answers = generate(llm, prompts, max_new_tokens=task.max_new_tokens, batch_size=batch_size)
        seconds = time.perf_counter() - started
        reference = reference or answers
        tokens = sum(len(llm.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        rows.append(
            {
                "batch_size": batch_size,
                "examples": len(prompts),
                "seconds": round(seconds, 2),
                "examples_per_s": round(len(prompts) / seconds, 3),
                "new_tokens_per_s": round(tokens / seconds, 1),
                "same_answers_as_first": sum(a == b for a, b in zip(answers, reference)),
            }
        )
        print(f"batch {batch_size}: {rows[-1]['examples_per_s']} examples/s", file=sys.stderr, flush=True)
    base = rows[0]["examples_per_s"]
    for row in rows:
        row["speedup"] = round(row["examples_per_s"] / base, 2)
    biggest = rows[-1]
    result = {
        "benchmark": "generation",
        "data": f"{args.questions} (first {len(prompts)} LaMP-7 queries, k=0 prompts)",
        "model": llm.id,
        "device": str(llm.device),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "max_new_tokens": task.max_new_tokens,
        "rows": rows,
        "goal": f"batch {biggest['batch_size']} >= 4x batch {rows[0]['batch_size']}",
        "goal_met": biggest["speedup"] >= 4.0,
    }
    print(f"\nLaMP-7, {len(prompts)} queries, {llm.id} on {llm.device} ({torch.get_num_threads()} threads), greedy, max {task.max_new_tokens} new tokens")
    print(f"{'batch':>5} {'seconds':>8} {'examples/s':>11} {'tokens/s':>9} {'speedup':>8} {'same answers':>13}")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['seconds']:>8} {r['examples_per_s']:>11} {r['new_tokens_per_s']:>9} {r['speedup']:>7}x {r['same_answers_as_first']:>6}/{r['examples']}")
    print(f"goal {result['goal']}: {'met' if result['goal_met'] else 'NOT met'} ({biggest['speedup']}x)")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
