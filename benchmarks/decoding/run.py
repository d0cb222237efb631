"""Benchmark: decoding options side by side on real LaMP-7 queries, with bootstrap intervals.

One method (default k=0 on the bare embedded SmolLM2; `--method task-lora` for the task LoRA),
the same queries, one run per decoding variant (greedy, repetition controls that count only the
answer's tokens, beam search, a length limit tied to the input), plus copying the input unchanged
(no model). Each variant's ROUGE-1 / ROUGE-L mean gets a 95% bootstrap interval, and its paired
per-query difference to greedy gets one too. Tuning belongs on the **train** split (the default):
a task's decoding defaults are chosen here, never on test users.

    .venv/bin/python benchmarks/decoding/run.py [--lamp ../shared/data/lamp7] [--store .persona-bench/lamp7]
        [--split train] [--users 100] [--method none] [--variants greedy,nr3,...] [--out benchmarks/decoding/results.json]

Writes results.json, results.md (the table) and results.png (the chart) beside --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.training.run import open_store  # noqa: E402

VARIANTS = {
    "greedy": {},
    "nr3": {"no_repeat_ngram_size": 3},
    "pen1.2": {"repetition_penalty": 1.2},
    "len1.5": {"length_ratio": 1.5},
    "nr3+len1.5": {"no_repeat_ngram_size": 3, "length_ratio": 1.5},
    "beam4": {"num_beams": 4},
    "beam4+nr3": {"num_beams": 4, "no_repeat_ngram_size": 3},
    "beam4+pen1.2": {"num_beams": 4, "repetition_penalty": 1.2},
}
METRICS = ("rouge-1", "rouge-L")


def summarize(rows: list[dict[str, float]], greedy: list[dict[str, float]] | None) -> dict:
    """Means with bootstrap intervals, and the paired difference to greedy's rows."""
    from recipes.kit.metrics import bootstrap_interval

    out: dict = {}
    for metric in METRICS:
        values = [r[metric] for r in rows]
        out[metric] = {"mean": round(sum(values) / len(values), 4), "ci95": [round(v, 4) for v in bootstrap_interval(values)]}
        if greedy is not None:
            diff = [r[metric] - g[metric] for r, g in zip(rows, greedy)]
            out[metric]["vs_greedy"] = {"mean": round(sum(diff) / len(diff), 4), "ci95": [round(v, 4) for v in bootstrap_interval(diff)]}
    return out


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    means = [results["variants"][n]["rouge-1"]["mean"] for n in names]
    lows = [m - results["variants"][n]["rouge-1"]["ci95"][0] for n, m in zip(names, means)]
    highs = [results["variants"][n]["rouge-1"]["ci95"][1] - m for n, m in zip(names, means)]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 4))
    ax.bar(names, means, yerr=[lows, highs], capsize=4, color=["#888888" if n == "copy input" else "#4c72b0" for n in names])
    ax.set_ylabel("ROUGE-1 (95% bootstrap CI)")
    ax.set_title(f"{results['task']} {results['method']}, {results['n_queries']} {results['split']}-split queries, {results['llm']}")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    lines = [
        f"{results['task']}, method `{results['method']}`, {results['n_queries']} queries of the {results['split']} split, {results['llm']}",
        "",
        "| decoding | R-1 [95% CI] | R-L [95% CI] | R-1 vs greedy [95% CI] | s |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["variants"].items():
        r1, rl = row["rouge-1"], row["rouge-L"]
        diff = r1.get("vs_greedy")
        diff_text = f"{diff['mean']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]" if diff else "-"
        lines.append(
            f"| {name} | {r1['mean']:.4f} [{r1['ci95'][0]:.4f}, {r1['ci95'][1]:.4f}] | {rl['mean']:.4f} [{rl['ci95'][0]:.4f}, {rl['ci95'][1]:.4f}]"
            f" | {diff_text} | {row.get('seconds', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lamp", type=Path, default=ROOT.parent / "shared" / "data" / "lamp7")
    parser.add_argument("--store", type=Path, default=ROOT / ".persona-bench" / "lamp7")
    parser.add_argument("--split", default="train", help="tune on train (default); report on test elsewhere")
    parser.add_argument("--users", type=int, default=100, help="the first N users of the split (by id)")
    parser.add_argument("--method", default="none", help="an evaluate --method, e.g. none or task-lora")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown[0]}; expected some of {', '.join(VARIANTS)}")
    if not (args.lamp / "questions.json").exists():
        sys.exit(f"no LaMP-7 data at {args.lamp} (questions.json, outputs.json)")

    from recipes.kit.backbones import load_llm
    from recipes.flows.evaluate import EvalRequest, evaluate, select_queries
    from recipes.kit.metrics import per_example_rouge
    from recipes.kit.tasks import get_task

    store = open_store(args.store, args.lamp)
    task = get_task("LaMP-7")
    queries = select_queries(store, task, args.split)
    users = sorted({q.user_id for q in queries})[: args.users]
    queries = [q for q in queries if q.user_id in set(users)]
    golds = [q.output for q in queries]
    results: dict = {
        "task": task.name, "data": str(args.lamp), "split": args.split, "method": args.method, "llm": None,
        "n_users": len(users), "n_queries": len(queries), "variants": {},
        "machine": {"platform": platform.platform(), "device": args.device},
    }  # fmt: skip
    copy_rows = per_example_rouge([task.query_text(q.input) for q in queries], golds)
    per_variant: dict[str, list[dict[str, float]]] = {}
    for name in variants:
        request = EvalRequest(task=task.name, method=args.method, split=args.split, users=users, batch_size=args.batch_size, **VARIANTS[name])
        started = time.perf_counter()
        run, predictions = evaluate(store, request, lambda: load_llm(None, args.device))  # fresh: a method's plug-ins merge into it
        results["llm"] = run.llm
        by_id = {p.query_id: p.output for p in predictions}
        per_variant[name] = per_example_rouge([by_id[q.query_id] for q in queries], golds)
        greedy = per_variant.get("greedy") if name != "greedy" else None
        results["variants"][name] = {**summarize(per_variant[name], greedy), "run_id": run.run_id, "seconds": round(time.perf_counter() - started, 1), "settings": VARIANTS[name]}
        print(f"{name:<12} R-1 {results['variants'][name]['rouge-1']['mean']:.4f}  ({results['variants'][name]['seconds']:.0f} s)", flush=True)
    results["variants"]["copy input"] = summarize(copy_rows, per_variant.get("greedy"))
    results["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(results))
    chart(results, args.out.with_suffix(".png"))
    print(table(results))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
