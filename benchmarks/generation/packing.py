"""Benchmark: generation with the linear layers' prepacked oneDNN weights against plain F.linear,
side by side in one process on the same LaMP-7 queries.

For each kind (as in run.py: `bare`, `lora-r8`, `pool-k3`, `soft`, `steer`) and batch size, both
ways run once per round, alternating which goes first, so the machine's drift hits both alike.
Reports each run's seconds, the medians, the change, and whether the answers are the same.

    .venv/bin/python benchmarks/generation/packing.py [--n 32] [--rounds 2] [--batch-sizes 1 16]
        [--kinds bare pool-k3] [--out benchmarks/generation/packing.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import DEFAULT_QUESTIONS, KINDS, timed  # noqa: E402  (run.py puts the project on the path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--n", type=int, default=32, help="queries (the first N of the file)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--kinds", nargs="+", default=["bare", "pool-k3"])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("packing.json"))
    args = parser.parse_args()
    if not args.questions.exists():
        sys.exit(f"{args.questions} not found: pass --questions path/to/lamp7/questions.json")

    import recipes.kit.generation as generation
    from recipes.kit.backbones import load_llm
    from recipes.kit.tasks import get_task

    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        sys.exit(f"unknown kinds {sorted(unknown)}: choose from {sorted(KINDS)}")
    llm = load_llm(None, device="cpu")
    prompts = [q["input"] for q in json.loads(args.questions.read_text())[: args.n]]
    max_new_tokens = get_task("LaMP-7").max_new_tokens
    packed = generation.packed_linears
    ways = {"packed": packed, "F.linear": lambda model, batched: contextlib.nullcontext()}
    generation.generate(llm, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up
    runs: dict[tuple[str, int, str], list[tuple[float, list[str]]]] = {}
    for round_ in range(args.rounds):
        for kind in args.kinds:
            per_row = KINDS[kind](llm, len(prompts))
            for batch_size in args.batch_sizes[:: -1 if round_ % 2 else 1]:
                order = list(ways) if (round_ + batch_size) % 2 else list(ways)[::-1]
                for way in order:
                    generation.packed_linears = ways[way]
                    try:
                        seconds, answers = timed(llm, prompts, max_new_tokens, batch_size, per_row)
                    finally:
                        generation.packed_linears = packed
                    runs.setdefault((kind, batch_size, way), []).append((seconds, answers))
                    print(f"round {round_ + 1} {kind} batch {batch_size} {way}: {seconds:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for kind in args.kinds:
        for batch_size in args.batch_sizes:
            plain, fast = runs[kind, batch_size, "F.linear"], runs[kind, batch_size, "packed"]
            before, after = statistics.median(t for t, _ in plain), statistics.median(t for t, _ in fast)
            rows.append({
                "kind": kind, "batch_size": batch_size,
                "seconds_f_linear": [round(t, 2) for t, _ in plain], "seconds_packed": [round(t, 2) for t, _ in fast],
                "change": round(after / before - 1, 3),
                "same_answers": min(sum(a == b for a, b in zip(got, plain[0][1])) for _, got in plain + fast),
            })  # fmt: skip
    result = {
        "benchmark": "generation: prepacked linear weights against F.linear",
        "data": f"{args.questions} (first {len(prompts)} LaMP-7 queries, k=0 prompts)",
        "model": llm.id, "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "rounds": args.rounds, "rows": rows,
    }  # fmt: skip
    print(f"\n{'kind':>8} {'batch':>5} {'F.linear s':>14} {'packed s':>14} {'change':>7} {'same':>6}")
    for r in rows:
        plain, fast = "/".join(map(str, r["seconds_f_linear"])), "/".join(map(str, r["seconds_packed"]))
        print(f"{r['kind']:>8} {r['batch_size']:>5} {plain:>14} {fast:>14} {r['change']:>+7.1%} {r['same_answers']:>3}/{len(prompts)}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
