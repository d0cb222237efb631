"""Benchmark: which attention kernel the trainers should use on CPU, torch's default (flash) or the plain one (math).

One Per-Pcs sharer's LoRA (the OPPU trainer) on that sharer's real LaMP-7 training pairs
(`--pairs rules`: the training user with the longest history), trained by `train_lora` for
`--steps` steps, once with torch's default kernel (flash) and once with the math kernel,
interleaved `--reps` times per precision and batch size so a drifting machine affects both
alike. Reports the median seconds per step of each and their
ratio, and the last training loss of each (the kernels compute the same attention).

    .venv/bin/python benchmarks/training/attention.py [--lamp ../shared/data/lamp7]
        [--store .persona-bench/lamp7] [--steps 6] [--reps 3] [--batch-sizes 4,8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import open_store  # noqa: E402  (this folder's training benchmark: the LaMP-7 store it ingests)


def sharer_examples(store) -> tuple[str, list]:
    """The training user with the longest LaMP-7 history and their rules-pairs examples."""
    from recipes.kit.history_pairs import paired_histories
    from recipes.kit.tasks import get_task
    from recipes.kit.training_data import history_examples, split_queries

    task = get_task("LaMP-7")
    users = sorted({q.user_id for q in split_queries(store, task, "train")})
    histories = store.histories(users, task.name)
    sharer = max(users, key=lambda u: len(histories.get(u, [])))
    paired = paired_histories(store, task, {sharer: histories[sharer]}, "rules", 0)
    return sharer, history_examples(task, paired[sharer])


def timed(llm, examples: list, batch_size: int, precision: str, steps: int, kernel: str) -> tuple[float, float]:
    """Seconds per step and last loss of one train_lora run with this attention kernel (the
    trainers' own kernel choice, training_autocast, is set aside so both kernels are measured
    in both precisions)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from recipes.kit import training_loop
    from recipes.kit.training_loop import LoraSettings, train_lora

    chosen = training_loop.training_autocast
    training_loop.training_autocast = training_loop.autocast_for
    try:
        settings = LoraSettings(learning_rate=1e-3, batch_size=batch_size, steps=steps, precision=precision, eval_every=10**6)
        with sdpa_kernel(SDPBackend.MATH) if kernel == "math" else contextlib.nullcontext():
            trained = train_lora(llm, examples, settings)
    finally:
        training_loop.training_autocast = chosen
    return trained.seconds / trained.steps, trained.curve[-1]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lamp", type=Path, default=ROOT.parent / "shared" / "data" / "lamp7")
    parser.add_argument("--store", type=Path, default=ROOT / ".persona-bench" / "lamp7")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("attention.json"))
    args = parser.parse_args()
    if not (args.lamp / "questions.json").exists():
        sys.exit(f"no LaMP-7 data at {args.lamp} (questions.json, outputs.json)")

    from recipes.kit.backbones import load_llm
    from recipes.kit.training_loop import autocast_dtype

    store = open_store(args.store, args.lamp)
    llm = load_llm(None, "cpu")
    sharer, examples = sharer_examples(store)
    precisions = ["float32"] + (["bfloat16"] if autocast_dtype(llm, "auto") is not None else [])
    print(f"sharer {sharer}: {len(examples)} examples; {args.steps} steps per run, {args.reps} interleaved reps", flush=True)
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for precision in precisions:
            runs: dict[str, list[tuple[float, float]]] = {"default": [], "math": []}
            for _ in range(args.reps):
                for kernel in runs:
                    runs[kernel].append(timed(llm, examples, batch_size, precision, args.steps, kernel))
            medians = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
            row = {
                "batch_size": batch_size, "precision": precision,
                "default_s_per_step": round(medians["default"], 3), "math_s_per_step": round(medians["math"], 3),
                "speedup": round(medians["default"] / medians["math"], 3),
                "runs": {k: [round(s, 3) for s, _ in v] for k, v in runs.items()},
                "last_loss": {k: v[0][1] for k, v in runs.items()},
            }  # fmt: skip
            rows.append(row)
            print(f"  batch {batch_size} {precision:<8} default {row['default_s_per_step']:.2f} s/step, "
                  f"math {row['math_s_per_step']:.2f} s/step: {row['speedup']:.2f}x", flush=True)  # fmt: skip
    results = {
        "task": "LaMP-7", "data": str(args.lamp), "sharer": sharer, "examples": len(examples), "steps": args.steps,
        "reps": args.reps, "rows": rows, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }  # fmt: skip
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
