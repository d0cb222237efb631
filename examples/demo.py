"""The end-to-end demo: every method trained briefly for real, then each personal method against
its own non-personal ablation on the same test users. `make demo` runs it on the bundled example
users (planted styles, examples/users.jsonl); `make demo-lamp LAMP=DIR` on a slice of real LaMP-7.

Each step prints the `persona` command it runs and runs that command's own code in this one
process (the CLI is loaded once instead of once per command; the output is the command's).
It ends with a table, results/report.{md,json,png} under the demo directory: ROUGE and, on the
example users, the share of answers written in the user's planted style, with a bootstrap 95%
interval of each personal method's paired difference to its ablation.

    python examples/demo.py [--dir .persona-demo] [--lamp DIR --users 120]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_users import PROMPT, shows_style  # noqa: E402

# each personal method and what its --ablation serves instead (the personal part taken away);
# the demo's main result is the difference between the two rows
PAIRS = {"oppu": "its task LoRA alone (the task LoRA's row)", "perpcs": "uniform gates", "pplug": "another user's history"}
STYLED_USERS = {"2": "#blessed", "36": "!!!", "4": "British", "8": "- Sam"}
SHARERS = ["12", "6", "14", "18"]  # non-test users writing #hashtags, !!!, British spelling, sign-offs (4 of the 9 styles; more sharers cost time)
NEW_INPUT = PROMPT + "The museum opens early on Sundays."


STEP_SECONDS: dict[str, float] = {}  # each step's title and wall time, for the closing breakdown
_current: list = []


def step(title: str) -> None:
    """Start a titled step (and close the one before: its time goes into STEP_SECONDS)."""
    now = time.perf_counter()
    if _current:
        STEP_SECONDS[_current[0]] = STEP_SECONDS.get(_current[0], 0.0) + now - _current[1]
    _current[:] = [title, now] if title else []
    if title:
        print(f"\n\033[1;36m== {title}\033[0m", flush=True)


def persona(store: Path, *args: str, quiet: bool = False) -> dict:
    """Print `persona ARGS` and run it here (see run_persona); a failing command returns its exit code."""
    from persona_cli.inprocess import run_persona

    return run_persona(store, *args, quiet=quiet)


# ---------- the two data sources ----------


def ingest_examples(store: Path) -> None:
    step("Ingest 48 example users, each writing in a planted style (examples/users.jsonl)")
    persona(store, "ingest", str(HERE / "users.jsonl"), "--task", "LaMP-7")
    step("What the store holds, and user 4 (British spelling): their latest items")
    persona(store, "store", "info")
    persona(store, "users", "show", "4", "--items", "3")
    step("Search user 4's history by meaning (LanceDB vector search over the stored vectors)")
    persona(store, "search", "--user", "4", "what colour do I like", "--k", "3")


def ingest_lamp(store: Path, lamp: Path, users: int, work: Path, seed: int) -> None:
    """A seeded slice of LaMP-7 (questions.json + outputs.json of DIR), ingested as LaMP JSON."""
    step(f"Ingest {users} LaMP-7 users (a seeded slice of {lamp})")
    questions = json.loads((lamp / "questions.json").read_text(encoding="utf-8"))
    outputs = json.loads((lamp / "outputs.json").read_text(encoding="utf-8"))
    picked = random.Random(seed).sample(questions, min(users, len(questions)))
    ids = {q["id"] for q in picked}
    (work / "questions.json").write_text(json.dumps(picked), encoding="utf-8")
    golds = [g for g in outputs["golds"] if g["id"] in ids]
    (work / "outputs.json").write_text(json.dumps({**outputs, "golds": golds}), encoding="utf-8")
    persona(store, "ingest", "--format", "lamp", str(work / "questions.json"), "--outputs", str(work / "outputs.json"), "--task", "LaMP-7")
    persona(store, "store", "info")


# ---------- the methods ----------


def train_everything(store: Path, lamp: bool) -> None:
    """Every method's training, small: the task LoRA first, then the three personal methods on it."""
    step("Task adaptation: a LoRA trained on the training users' (prompt, gold) pairs, stored as a plug-in")
    persona(store, "adapt", "--task", "LaMP-7", "--steps", "16", "--eval-every", "8")

    step("OPPU: one LoRA per test user, trained on that user's own history only, over the task LoRA")
    persona(store, "train-oppu", "--task", "LaMP-7", "--split", "test", "--steps", "3", "--batch-size", "4", "--lr", "4e-3")

    # planted styles: mean gates pick the sharer who writes like the user (one piece per module);
    # real LaMP-7 users' styles are too alike for that (README): the paper's trained gates, top-3
    if lamp:
        step("Per-Pcs: sharers (never test users) train a LoRA and its gates; their pieces become pool version pool-1")
        sharers, gates, top_k = ["--strategy", "history-cluster", "--k", "10"], ["--steps", "4", "--gate-steps", "4"], "3"
    else:
        step("Per-Pcs: sharers (never test users) train a LoRA; each piece's gate is the sharer's mean activation there; pool version pool-1")
        sharers, gates, top_k = [arg for s in SHARERS for arg in ("--sharer", s)], ["--gates", "mean", "--steps", "6", "--lr", "1e-2"], "1"
    persona(store, "register-sharers", "--task", "LaMP-7", *sharers, *gates, "--max-length", "128")
    step(f"Assemble every test user's adapter from the pool, without training: per module the top-{top_k} pieces by gate score")
    persona(store, "assemble", "--task", "LaMP-7", "--split", "test", "--top-k", top_k)

    step("PPlug: one user embedder for everyone (input encoder, projector, instruction token), the task-adapted LLM frozen")
    persona(store, "train-embedder", "--task", "LaMP-7", "--base", "task-lora-LaMP-7", "--history-examples", "--steps", "80",
            "--lr", "6e-3", "--encoder-lr", "0", "--eval-every", "80", "--max-length", "128")  # fmt: skip


def show_styles(store: Path) -> None:
    step(f"One input, {len(STYLED_USERS)} test users the methods never trained on... except through their history")
    for user, style in STYLED_USERS.items():
        for method in ("pplug", "oppu", "perpcs"):
            answer = persona(store, "generate", "--user", user, "--method", method, NEW_INPUT, quiet=True)
            print(f"   user {user:>2} (writes {style:>9}) {method:<6} -> {answer.get('output')}", flush=True)
    answer = persona(store, "generate", "--user", "2", NEW_INPUT, quiet=True)
    print(f"   any user, not personalized (k=0)       -> {answer.get('output')}", flush=True)

    step("A user ingested after training is served at once: a new '#blessed' writer, no training")
    sentences = ["The bakery on the corner sells fresh bread.", "My brother fixed the old bicycle.",
                 "We watched the sunset from the hill.", "The library is quiet in the morning.",
                 "I planted tomatoes in the backyard.", "The train was late again today."]  # fmt: skip
    history = [{"id": f"new-{i}", "input": s, "text": f"{s} #blessed"} for i, s in enumerate(sentences)]
    newcomer = store.parent / "newcomer.jsonl"
    newcomer.write_text(json.dumps({"user_id": "newcomer", "history": history}) + "\n", encoding="utf-8")
    persona(store, "ingest", str(newcomer), "--task", "LaMP-7")
    answer = persona(store, "generate", "--user", "newcomer", "--method", "pplug", NEW_INPUT, quiet=True)
    print(f"   newcomer pplug -> {answer.get('output')}", flush=True)
    step("Which of user 2's history items weigh most in their personal embedding for this input")
    persona(store, "explain", "--user", "2", "--top", "3", NEW_INPUT)


# ---------- the comparison ----------


def evaluate_all(store: Path) -> dict[str, dict]:
    """Every method and every ablation on the same test users' queries; each run is stored. OPPU's
    ablation is the task LoRA itself (same adapters, same answers), so it is the task LoRA's row."""
    step("Evaluate every method and each personal method's ablation on the same test users' queries")
    runs = {}
    plans = {"k=0": ["--method", "none"], "RAG k=2": ["--method", "rag", "--k", "2"]}
    for method in PAIRS:
        plans |= {method: ["--method", method], f"{method} ablation": ["--method", method, "--ablation"]}
    for label, args in plans.items():
        run = persona(store, "evaluate", "--task", "LaMP-7", *args, "--batch-size", "40", quiet=True)
        runs[label] = run
        metrics = "  ".join(f"{k} {v:.3f}" for k, v in run["metrics"].items())
        print(f"   run {run['run_id']}: {label:<16} {metrics}  ({run['n_examples']} queries, {run['wall_s']:.0f} s)", flush=True)
    return runs


def per_query(opened, inputs: dict[str, str], run: dict, styles: dict[str, str] | None) -> list[dict]:
    """Each prediction's ROUGE and, with planted styles, whether it is written in its user's style."""
    from recipes.kit.metrics import per_example_rouge

    predictions = sorted(opened.run_predictions(run["run_id"]), key=lambda p: p.query_id)
    rows = per_example_rouge([p.output for p in predictions], [p.gold or "" for p in predictions])
    for row, p in zip(rows, predictions):
        row["query_id"] = p.query_id
        if styles:
            row["style"] = shows_style(styles[p.user_id], p.output, inputs[p.query_id].removeprefix(PROMPT))
    return rows


def report(store: Path, runs: dict[str, dict], styles: dict[str, str] | None, out: Path) -> dict:
    """The table, JSON and chart: every run's means, each personal method's paired difference to its ablation."""
    from recipes.kit.metrics import bootstrap_interval
    from store import Store

    opened = Store(str(store))
    inputs = {q.query_id: q.input for q in opened.task_queries("LaMP-7")}
    rows = {label: per_query(opened, inputs, run, styles) for label, run in runs.items()}
    measure = "style" if styles else "rouge-1"

    def values(label: str) -> list[float]:
        return [float(r[measure]) for r in rows[label] if r.get(measure) is not None]

    summary = {"measure": measure, "runs": {}, "pairs": {}}
    for label, run in runs.items():
        entry = {"run_id": run["run_id"], "method": run["method"], "n": run["n_examples"], **run["metrics"]}
        if styles:
            hits = values(label)
            entry["style_hit_rate"] = sum(hits) / len(hits)
        summary["runs"][label] = entry
    for method, ablated in PAIRS.items():
        ours, theirs = rows[method], rows[f"{method} ablation"]
        diffs = [float(a[measure]) - float(b[measure]) for a, b in zip(ours, theirs) if a.get(measure) is not None]
        low, high = bootstrap_interval(diffs)
        summary["pairs"][method] = {"ablation": ablated, "difference": sum(diffs) / len(diffs), "ci95": [low, high], "n": len(diffs)}
    (out / "report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (out / "report.md").write_text(markdown(summary, styles is not None), encoding="utf-8")
    chart(summary, styles is not None, out / "report.png")
    return summary


def markdown(summary: dict, styled: bool) -> str:
    runs = summary["runs"]
    head = "| method | R-1 | R-L |" + (" style hits |" if styled else "")
    lines = [head, "|---|---|---|" + ("---|" if styled else "")]
    for label, entry in runs.items():
        style = f" {entry['style_hit_rate']:.3f} |" if styled else ""
        lines.append(f"| {label} | {entry['rouge-1']:.4f} | {entry['rouge-L']:.4f} |{style}")
    what = "style hit rate" if styled else "ROUGE-1"
    lines += ["", f"Each personal method minus its ablation ({what}, paired over the same queries, bootstrap 95% interval):", ""]
    for method, pair in summary["pairs"].items():
        low, high = pair["ci95"]
        verdict = "ahead" if low > 0 else ("behind" if high < 0 else "not separable")
        lines.append(f"- {method} vs {pair['ablation']}: {pair['difference']:+.3f} [{low:+.3f}, {high:+.3f}] over {pair['n']} queries: {verdict}")
    return "\n".join(lines) + "\n"


def chart(summary: dict, styled: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "style_hit_rate" if styled else "rouge-1"
    labels = list(summary["runs"])
    heights = [summary["runs"][label][key] for label in labels]
    colors = ["#1f77b4" if "ablation" not in label else "#aaaaaa" for label in labels]
    figure, axis = plt.subplots(figsize=(9, 4))
    axis.bar(labels, heights, color=colors)
    axis.set_ylabel("answers in the user's planted style" if styled else "ROUGE-1")
    axis.set_title("each personal method (blue) beside its non-personal ablation (grey)")
    axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def bad_input(store: Path) -> None:
    step("Bad input is refused with file, line and field, and the store is left as it was")
    bad = store.parent / "bad.jsonl"
    bad.write_text('{"user_id": "99", "history": [{"id": "a", "text": ""}]}\n', encoding="utf-8")
    before = persona(store, "store", "info", quiet=True)
    result = persona(store, "ingest", str(bad), "--task", "LaMP-7")
    after = persona(store, "store", "info", quiet=True)
    same = [(t["table"], t["rows"]) for t in before["tables"]] == [(t["table"], t["rows"]) for t in after["tables"]]
    print(f"   (exit code {result.get('exit_code')}, store unchanged: {same})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(".persona-demo"), help="Working directory (wiped first).")
    parser.add_argument("--lamp", type=Path, help="A LaMP-7 folder (questions.json, outputs.json) instead of the example users.")
    parser.add_argument("--users", type=int, default=120, help="With --lamp: how many users to slice.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    shutil.rmtree(args.dir, ignore_errors=True)
    (args.dir / "results").mkdir(parents=True)
    store = args.dir / "store"
    if args.lamp:
        ingest_lamp(store, args.lamp, args.users, args.dir, args.seed)
        styles = None
    else:
        ingest_examples(store)
        styles = {u["user_id"]: u["style"] for u in map(json.loads, (HERE / "users.jsonl").read_text(encoding="utf-8").splitlines())}
        step("Generate for user 4, first not personalized (k=0), then with RAG over user 4's own items")
        colour = PROMPT + "My favorite color has always been a deep shade of blue."
        persona(store, "generate", "--user", "4", colour)
        persona(store, "generate", "--user", "4", "--method", "rag", "--k", "3", colour)
    train_everything(store, lamp=args.lamp is not None)
    if styles:
        show_styles(store)
    runs = evaluate_all(store)
    report(store, runs, styles, args.dir / "results")
    if not args.lamp:
        bad_input(store)
    step(f"The result ({args.dir / 'results'}/report.md, .json, .png)")
    print((args.dir / "results" / "report.md").read_text(encoding="utf-8"))
    step("")
    print("where the time went:")
    for title, seconds in STEP_SECONDS.items():
        print(f"   {seconds:5.0f} s  {title[:90]}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
