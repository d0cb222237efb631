"""Benchmark: every method and each personal method's non-personal ablation on the same LaMP test users.

For one LaMP folder (questions.json + outputs.json) and the toolkit's own user split, it ingests
the users (once), trains what the methods need (each step skipped when the store already holds
it: a stopped run resumes), and evaluates on the same test users:

- copy the input unchanged (generation tasks) or the most frequent training label (classification);
- k=0; RAG with k chosen on training-split users (never on test users) among --rag-ks, and its
  ablation: the same retrieval from another user's history;
- the task LoRA (trained on the training users' queries, and with --pairs rules their history pairs);
- the task LoRA trained on RAG prompts (adapt --rag-k K) served with RAG k=K, and its ablation: the
  same retrieval from another user's history;
- OPPU over the task LoRA, and its ablation: the task LoRA alone;
- Per-Pcs (sharers from the training split, assembled for the test users), and uniform gates;
- PPlug over the task LoRA, and another user's history;
- with --reuse-history, each personal row again with the user's own earlier answer reused where
  the input nearly repeats a history item (recipes.methods.history_reuse), and its ablation
  (a donor's history reused); the threshold given, or chosen on training-split users (`auto`);
- with --user-spellings, each personal row again with its answers spelled the user's way
  (recipes.methods.user_spellings; with --reuse-history too, both), and its ablation (a donor's
  spellings); the minimum count given, or chosen on training-split users (`auto`);
- every training-free model method in the registry (`persona methods`: nothing to train, e.g.
  style-vector), over the task LoRA where it takes one, and its ablation.

It writes results.json, results.md and results.png (means with bootstrap 95% intervals, each
personal method's paired difference to its ablation, RAG's to k=0, the best method's to the copy
baseline, and Per-Pcs assembly seconds per user against OPPU training seconds per user).

    .venv/bin/python benchmarks/lamp/run.py --data ../shared/data/lamp7 --store .persona-bench/lamp7 [--users N] [--quick]
        [--methods rag,task-lora,task-lora-rag,...] (copy and k=0 always run; each row's training only when chosen)
        [--reuse-history auto|THRESHOLD] (each personal row also with its history reused, and that row's ablation)
        [--user-spellings auto|MIN_COUNT] (... and with its answers spelled the user's way)
    Finished evaluations are recorded in OUT/evaluations.json: a rerun evaluates only rows it lacks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from persona_cli.inprocess import run_persona  # noqa: E402

GROUPS = ("rag", "task-lora", "task-lora-rag", "oppu", "perpcs", "pplug", "training-free")
"""What a run can be limited to (--methods); copy-the-input (or the most frequent label) and k=0 always run."""


def training_free() -> list:
    """Registered model methods that need nothing trained: the benchmark runs them as they are."""
    from recipes.methods.registry import methods

    return [m for m in methods() if m.kind == "model" and m.trained_by is None]


def settings(quick: bool) -> dict:
    """Training sizes: the full run's, or a quick run's for smoke tests (minutes on 2 cores)."""
    if quick:
        return {"task_steps": 40, "oppu_steps": 4, "sharers": 8, "sharer_steps": 8, "pplug_steps": 60, "tune_users": 20}
    return {"task_steps": 300, "oppu_steps": None, "sharers": 20, "sharer_steps": 50, "pplug_steps": 400, "tune_users": 60}


def cli(store: Path, *args: str) -> dict:
    """One persona command with --json; a failure stops the benchmark with the command's error."""
    out = run_persona(store, *args, quiet=True)
    if "exit_code" in out:
        raise SystemExit(f"persona {' '.join(args)} failed (exit {out['exit_code']})")
    return out


def ingest(store: Path, data: Path, task: str) -> None:
    from store import Store

    if Store(str(store)).count("users"):
        return
    cli(store, "ingest", "--format", "lamp", str(data / "questions.json"), "--outputs", str(data / "outputs.json"), "--task", task)


def split_ids(store: Path, task: str, split: str, n: int | None, seed: int, out: Path) -> Path:
    """A seeded sample of N users of a split with gold queries, as a user-id file."""
    from recipes.kit.splits import query_split
    from store import Store

    ids = sorted({q.user_id for q in Store(str(store)).task_queries(task) if q.output and query_split(q.split, q.user_id) == split})
    picked = sorted(random.Random(seed).sample(ids, n)) if n and n < len(ids) else ids
    path = out / f"{split}_users.txt"
    path.write_text("\n".join(picked) + "\n", encoding="utf-8")
    return path


def has_plugin(store: Path, name: str) -> bool:
    from store import Store

    return bool(Store(str(store)).get_plugins([name]))


def train(store: Path, task: str, size: dict, test_ids: Path, names: dict, pairs: str, groups: set[str], timings: dict) -> None:
    """Everything the chosen groups need, each step skipped when already stored."""
    needs_task_lora = groups & {"task-lora", "oppu", "perpcs", "pplug", "training-free"}
    if needs_task_lora and not has_plugin(store, names["task_lora"]):
        cli(store, "adapt", "--task", task, "--name", names["task_lora"], "--steps", str(size["task_steps"]), "--pairs", pairs)
    if "task-lora-rag" in groups and not has_plugin(store, names["task_lora_rag"]):
        cli(store, "adapt", "--task", task, "--name", names["task_lora_rag"], "--steps", str(size["task_steps"]), "--pairs", pairs,
            "--rag-k", str(names["rag_train_k"]), *threshold("--rag-min-similarity", names["rag_train_min_similarity"]))  # fmt: skip
    if "oppu" in groups:
        oppu_steps = ["--steps", str(size["oppu_steps"])] if size["oppu_steps"] else []
        oppu = cli(store, "train-oppu", "--task", task, "--users", str(test_ids), "--base", names["task_lora"], "--name", names["oppu"],
                   "--pairs", pairs, *oppu_steps)  # fmt: skip
        timings["oppu_train_s_per_user"] = oppu["mean_train_seconds"]  # the stored adapters' own seconds where they are reused
        timings["oppu_users_trained_in_this_run"] = oppu["trained"]  # 0: the speedup below compares with an earlier run's training
    if "perpcs" in groups:
        from store import Store

        if names["pool"] not in Store(str(store)).pool_tags():
            cli(store, "register-sharers", "--task", task, "--strategy", "history-cluster", "--k", str(size["sharers"]),
                "--base", names["task_lora"], "--steps", str(size["sharer_steps"]), "--gate-steps", str(size["sharer_steps"]),
                "--tag", names["pool"], "--pairs", pairs)  # fmt: skip
        assembled = cli(store, "assemble", "--task", task, "--users", str(test_ids), "--pool", names["pool"], "--top-k", "3",
                        "--history-format", names["perpcs_history_format"],
                        *(["--max-items", str(names["perpcs_max_items"])] if names["perpcs_max_items"] else []))  # fmt: skip
        seconds = [entry["seconds"] for entry in assembled["users"].values()]
        timings["perpcs_assembly_s_per_user"] = round(statistics.mean(seconds), 3) if seconds else None
    if "pplug" in groups and not has_plugin(store, names["pplug"]):
        cli(store, "train-embedder", "--task", task, "--base", names["task_lora"], "--name", names["pplug"], "--pairs", pairs,
            "--steps", str(size["pplug_steps"]))  # fmt: skip


def stored_config(store: Path, name: str) -> dict:
    from store import Store

    return Store(str(store)).get_plugin(name).config


def threshold(flag: str, value: float | None) -> list[str]:
    """`flag VALUE` for a similarity threshold that is set, nothing otherwise."""
    return [] if value is None else [flag, str(value)]


def choose_rag_k(store: Path, task: str, ks: list[int], tune_ids: Path, decode: list[str]) -> tuple[int, dict]:
    """k of RAG picked on training-split users by the task's first metric (k=0 among the choices)."""
    from recipes.kit.tasks import get_task

    metric = get_task(task).metric_names[0]
    better = get_task(task).higher_is_better(metric)
    scores = {0: cli(store, "evaluate", "--task", task, "--split", "train", "--users", str(tune_ids), *decode)["metrics"][metric]}
    for k in ks:
        run = cli(store, "evaluate", "--task", task, "--method", "rag", "--k", str(k), "--split", "train", "--users", str(tune_ids), *decode)
        scores[k] = run["metrics"][metric]
    best = max(scores, key=lambda k: scores[k] if better else -scores[k])
    return best, scores


REUSE_GRID = [round(0.25 + 0.025 * i, 3) for i in range(27)]
"""Overlap thresholds (ROUGE-1 F, 0.25 to 0.9) --reuse-history auto chooses among."""


def training_split_queries(store: Path, task: str) -> tuple:
    """(task spec, the training-split users' gold queries (train and dev, never test), their
    histories, per-query ROUGE-1 of copying the input): what the model-free choices read."""
    from recipes.kit.metrics import per_example_rouge
    from recipes.kit.splits import query_split
    from recipes.kit.tasks import get_task
    from store import Store

    spec, opened = get_task(task), Store(str(store))
    if spec.is_classification:
        raise SystemExit("'auto' chooses against copying the input: give a number for a label task")
    queries = [q for q in opened.task_queries(task) if q.output and query_split(q.split, q.user_id) != "test"]
    histories = opened.histories(sorted({q.user_id for q in queries}), task)
    copy = [r["rouge-1"] for r in per_example_rouge([spec.query_text(q.input) for q in queries], [q.output or "" for q in queries])]
    return spec, queries, histories, copy


def cross_validated_choice(gains: dict, folds: int, seed: int) -> dict:
    """The grid value whose per-query gains add up most, and a k-fold cross-validation of that
    choice: what the value chosen on the other folds gains on each held-out fold."""
    n = len(next(iter(gains.values())))
    best = lambda ids: max(gains, key=lambda value: sum(gains[value][i] for i in ids))  # noqa: E731
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out, chosen = 0.0, []
    for fold in range(folds):
        test = set(order[fold::folds])
        value = best([i for i in order if i not in test])
        chosen.append(value)
        held_out += sum(gains[value][i] for i in test)
    value = best(order)
    return {"value": value, "gain_over_copy": round(sum(gains[value]) / n, 4),
            "cross_validated": {"folds": folds, "chosen": chosen, "held_out_gain_over_copy": round(held_out / n, 4)}}  # fmt: skip


def choose_reuse(store: Path, task: str, folds: int = 5, seed: int = 0) -> dict:
    """--reuse-history's threshold, chosen on the training-split users' queries with no model: the
    threshold at which answering with the reused item instead of copying the input gains the most
    ROUGE-1 in all, cross-validated. Generation tasks with a copy baseline only."""
    from rouge_score import rouge_scorer

    from recipes.kit.metrics import per_example_rouge
    from recipes.methods.history_reuse import closest_item

    spec, queries, histories, copy = training_split_queries(store, task)
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    closest = [closest_item(spec, spec.query_text(q.input), histories.get(q.user_id, []), scorer) for q in queries]
    item = per_example_rouge([spec.normalize(answer or "") for _, answer in closest], [q.output or "" for q in queries])
    gain = [i["rouge-1"] - c for i, c in zip(item, copy)]
    gains = {t: [g if answer is not None and overlap >= t else 0.0 for g, (overlap, answer) in zip(gain, closest)] for t in REUSE_GRID}
    choice = cross_validated_choice(gains, folds, seed)
    threshold = choice.pop("value")
    reused = sum(answer is not None and overlap >= threshold for overlap, answer in closest)
    return {"threshold": threshold, "queries": len(queries), "reused": reused, **choice}


SPELLING_GRID = [1, 2, 3, 4, 5, 6]
"""Minimum counts --user-spellings auto chooses among."""


def choose_spellings(store: Path, task: str, folds: int = 5, seed: int = 0) -> dict:
    """--user-spellings' minimum count, chosen on the training-split users' queries with no model:
    the count at which respelling the copied input by the user's history gains the most ROUGE-1
    over the copy, cross-validated; with what the same respelling by a donor's history gains."""
    from recipes.kit.metrics import per_example_rouge
    from recipes.kit.retrieval import donors
    from recipes.methods.user_spellings import respelled_answers

    spec, queries, histories, copy = training_split_queries(store, task)
    inputs, golds, users = [spec.query_text(q.input) for q in queries], [q.output or "" for q in queries], [q.user_id for q in queries]
    gains, changed = {}, {}
    for count in SPELLING_GRID:
        answers, changed[count] = respelled_answers(spec, inputs, users, histories, count)
        gains[count] = [r["rouge-1"] - c for r, c in zip(per_example_rouge(answers, golds), copy)]
    choice = cross_validated_choice(gains, folds, seed)
    count = choice.pop("value")
    owner = donors(sorted(histories), seed, "spellings")
    answers, by_donor = respelled_answers(spec, inputs, users, {u: histories.get(owner[u], []) for u in histories}, count)
    donor_gain = sum(r["rouge-1"] - c for r, c in zip(per_example_rouge(answers, golds), copy)) / len(queries)
    return {"min_count": count, "queries": len(queries), "respelled": changed[count], **choice,
            "donor_history_gain_over_copy": round(donor_gain, 4), "donor_history_respelled": by_donor}  # fmt: skip


def with_history(rows: dict[str, list[str]], reuse: float | None, spellings: int | None) -> dict[str, list[str]]:
    """Each personal row again with its history stages (--reuse-history, --user-spellings), and that
    row's ablation with them (which reads the donor's history): 'LABEL + reuse + spellings'."""
    stages = ([" + reuse", ["--reuse-history", str(reuse)]] if reuse is not None else []) + \
        ([" + spellings", ["--user-spellings", str(spellings)]] if spellings is not None else [])
    if not stages:
        return rows
    suffix = "".join(stages[0::2])
    extra = [arg for args in stages[1::2] for arg in args]
    more = dict(rows)
    for label in [label for label in rows if f"{label} ablation" in rows]:
        more[f"{label}{suffix}"] = [*rows[label], *extra]
        more[f"{label}{suffix} ablation"] = [*rows[f"{label} ablation"], *extra]
    return more


def plans(names: dict, rag_k: int | None, groups: set[str]) -> dict[str, list[str]]:
    """Every chosen row's evaluate arguments, each personal row followed by its ablation ('LABEL ablation')."""
    rows: dict[str, list[str]] = {"k=0": ["--method", "none"]}
    if "rag" in groups and rag_k:
        rows[f"RAG k={rag_k}"] = ["--method", "rag", "--k", str(rag_k)]
        rows[f"RAG k={rag_k} ablation"] = ["--method", "rag", "--k", str(rag_k), "--ablation"]
    elif "rag" in groups:
        rows["RAG (k=0 chosen)"] = ["--method", "none"]
    if "task-lora" in groups:
        rows["task LoRA"] = ["--method", "task-lora", "--plugin", names["task_lora"]]
    if "task-lora-rag" in groups:
        rag_lora = ["--method", "rag", "--k", str(names["rag_train_k"]), "--base", names["task_lora_rag"], *threshold("--min-similarity", names["rag_min_similarity"])]
        rows["task LoRA+RAG"] = rag_lora
        rows["task LoRA+RAG ablation"] = [*rag_lora, "--ablation"]
    personal = {
        "oppu": ["--method", "oppu", "--plugin", names["oppu"]],
        "perpcs": ["--method", "perpcs", "--pool", names["pool"]],
        "pplug": ["--method", "pplug", "--plugin", names["pplug"]],
    }
    for group, args in personal.items():
        if group in groups:
            rows[group], rows[f"{group} ablation"] = args, [*args, "--ablation"]
    if "training-free" in groups:
        for method in training_free():
            base = ["--plugin", names["task_lora"]] if "plugin" in method.options else []
            rows[method.name] = ["--method", method.name, *base]
            if method.ablation:
                rows[f"{method.name} ablation"] = ["--method", method.name, *base, "--ablation"]
    return rows


def assembly_fingerprint(store: Path, task: str, users: list[str]) -> str:
    """A digest of the users' stored Per-Pcs assemblies (pool version, pieces and weights): a
    Per-Pcs evaluation is reused only while the assemblies it served are the same ones."""
    from store import Store

    wanted = set(users)
    records = sorted((r for r in Store(str(store)).list_assemblies(task) if r.user_id in wanted), key=lambda r: (r.user_id, r.pool_version, r.top_k))
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.user_id}\t{record.pool_version}\t{record.top_k}\t".encode() + record.choice)
    return digest.hexdigest()[:16]


def evaluate_all(store: Path, task: str, test_ids: Path, rows: dict[str, list[str]], decode: list[str], done: Path) -> dict[str, str]:
    """Every row's run on the test users; returns label -> run id. Each finished run is recorded in
    `done` (its evaluate arguments, the test users themselves and, for Per-Pcs rows, the assemblies
    served -> run id), so a stopped benchmark resumes where it was and a rerun with more rows
    evaluates only those (delete the file to start over, e.g. after changing a method's code)."""
    from store import Store

    finished = json.loads(done.read_text(encoding="utf-8")) if done.exists() else {}
    stored = {run.run_id for run in Store(str(store)).list_runs(task)}
    users = test_ids.read_text(encoding="utf-8")
    assemblies = None
    runs = {}
    for label, args in rows.items():
        argv = ["evaluate", "--task", task, "--users", str(test_ids), *args, *decode]
        served = []
        if any(arg.startswith("perpcs") for arg in args):
            assemblies = assemblies or assembly_fingerprint(store, task, users.split())
            served = [assemblies]
        key = json.dumps([[arg for arg in argv if arg != str(test_ids)], users, *served])  # the users themselves, wherever their file is
        if finished.get(key) not in stored:
            finished[key] = cli(store, *argv)["run_id"]
            done.write_text(json.dumps(finished, indent=1), encoding="utf-8")
        runs[label] = finished[key]
    return runs


def per_query_scores(store: Path, task: str, runs: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per-query scores of every run, by measure (ROUGE-1, ROUGE-L and the supplementary cased
    ROUGE-1, or 1/0 accuracy for label tasks; the first is the primary), plus the copy or
    most-frequent-label baseline on the same queries."""
    from recipes.kit.metrics import per_example_generation_scores
    from recipes.kit.splits import query_split
    from recipes.kit.tasks import get_task
    from store import Store

    spec, opened = get_task(task), Store(str(store))
    generation = not spec.is_classification
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for label, run_id in runs.items():
        predictions = opened.run_predictions(run_id)
        if generation:
            answered = [p.query_id for p in predictions]
            for m, values in per_example_generation_scores([p.output for p in predictions], [p.gold or "" for p in predictions]).items():
                scores.setdefault(m, {})[label] = dict(zip(answered, values))
        else:
            scores.setdefault("accuracy", {})[label] = {p.query_id: float(p.output == p.gold) for p in predictions}
    queries = {q.query_id: q for q in opened.task_queries(task)}
    ids = sorted(set.intersection(*(set(s) for s in next(iter(scores.values())).values())))
    if generation:
        copies = per_example_generation_scores([spec.query_text(queries[i].input) for i in ids], [queries[i].output or "" for i in ids])
        for m, values in copies.items():
            scores[m] = {"copy the input": dict(zip(ids, values)), **scores[m]}
    else:
        train_golds = [q.output for q in queries.values() if q.output and query_split(q.split, q.user_id) == "train"]
        frequent = Counter(train_golds).most_common(1)[0][0]
        scores["accuracy"] = {f"most frequent label ({frequent})": {i: float(queries[i].output == frequent) for i in ids}, **scores["accuracy"]}
    return {m: {label: {i: s[i] for i in ids} for label, s in by_label.items()} for m, by_label in scores.items()}


def summarize(by_measure: dict[str, dict[str, dict[str, float]]], rag_label: str | None) -> dict:
    """Means with bootstrap intervals for every measure; paired differences on the primary one,
    and each personal row against its ablation in the others too."""
    from recipes.kit.metrics import bootstrap_interval

    def interval(values: list[float]) -> list[float]:
        low, high = bootstrap_interval(values)
        return [round(sum(values) / len(values), 4), round(low, 4), round(high, 4)]

    def paired(a: str, b: str, among: dict[str, dict[str, float]] | None = None) -> list[float]:
        among = among or scores
        return interval([among[a][i] - among[b][i] for i in among[a]])

    measure, scores = next(iter(by_measure.items()))
    methods = {label: interval(list(values.values())) for label, values in scores.items()}
    others = {m: {label: interval(list(values.values())) for label, values in s.items()} for m, s in list(by_measure.items())[1:]}
    baseline = next(iter(scores))
    best = max((label for label in scores if label != baseline and "ablation" not in label), key=lambda label: methods[label][0])
    differences = {f"{m} - {m} ablation": paired(m, f"{m} ablation") for m in scores if f"{m} ablation" in scores}
    if rag_label:
        differences[f"{rag_label} - k=0"] = paired(rag_label, "k=0")
    if "task LoRA+RAG" in scores and "task LoRA" in scores:
        differences["task LoRA+RAG - task LoRA"] = paired("task LoRA+RAG", "task LoRA")
    for label in [label for label in scores if " + " in label and "ablation" not in label]:  # a row with history stages
        differences[f"{label} - {label.split(' + ')[0]}"] = paired(label, label.split(" + ")[0])
    if "perpcs" in scores and "task LoRA" in scores:  # Per-Pcs should beat the base it starts from
        differences["perpcs - task LoRA"] = paired("perpcs", "task LoRA")
    differences[f"{best} - {baseline}"] = paired(best, baseline)
    other_differences = {  # personal against non-personal in every other measure too
        m: {f"{label} - {label} ablation": paired(label, f"{label} ablation", s) for label in s if f"{label} ablation" in s}
        for m, s in list(by_measure.items())[1:]
    }  # fmt: skip
    ratios = {"perpcs / oppu": round(methods["perpcs"][0] / methods["oppu"][0], 4)} if "perpcs" in scores and "oppu" in scores else {}
    return {"measure": measure, "n_queries": len(scores[baseline]), "methods": methods, "other_measures": others,
            "differences": differences, "other_differences": other_differences, "ratios": ratios, "best": best}  # fmt: skip


def markdown(summary: dict, header: str) -> str:
    others = summary.get("other_measures", {})
    lines = [header, "", "| method | " + " | ".join(f"{m} [95% CI]" for m in [summary["measure"], *others]) + " |",
             "|---" * (1 + 1 + len(others)) + "|"]  # fmt: skip
    for label, (mean, low, high) in summary["methods"].items():
        cells = [f"{mean:.4f} [{low:.3f}, {high:.3f}]"] + [f"{o[label][0]:.4f} [{o[label][1]:.3f}, {o[label][2]:.3f}]" for o in others.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences over the same queries (bootstrap 95%):", ""]
    lines += [difference_line(label, values) for label, values in summary["differences"].items()]
    for label, ratio in summary.get("ratios", {}).items():
        lines.append(f"- {label} ({summary['measure']}): {ratio:.4f}")
    for measure, differences in summary.get("other_differences", {}).items():
        if differences:
            lines += ["", f"The same personal rows against their ablations in {measure}:", ""]
            lines += [difference_line(label, values) for label, values in differences.items()]
    return "\n".join(lines) + "\n"


def difference_line(label: str, values: list[float]) -> str:
    mean, low, high = values
    verdict = "ahead" if low > 0 else "behind" if high < 0 else "not separable"
    return f"- {label}: {mean:+.4f} [{low:+.4f}, {high:+.4f}]: {verdict}"


def chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary["methods"])
    means = [summary["methods"][label][0] for label in labels]
    errors = [[m - summary["methods"][label][1] for label, m in zip(labels, means)],
              [summary["methods"][label][2] - m for label, m in zip(labels, means)]]  # fmt: skip
    colors = ["#aaaaaa" if "ablation" in label else "#1f77b4" for label in labels]
    figure, axis = plt.subplots(figsize=(9, 1.2 + 0.38 * len(labels)))  # one row per method: long labels stay readable
    axis.barh(labels, means, xerr=errors, capsize=3, color=colors)
    axis.invert_yaxis()  # the table's order, top to bottom
    axis.set_xlabel(f"{summary['measure']} (95% bootstrap CI)")
    axis.set_title(f"each method on the same {summary['n_queries']} test queries (ablations grey)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    from recipes.kit.history_pairs import PAIR_RECIPES
    from recipes.methods.perpcs.assembly import HISTORY_FORMATS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a LaMP folder with questions.json and outputs.json")
    parser.add_argument("--task", default="LaMP-7")
    parser.add_argument("--store", type=Path, required=True, help="the benchmark's store (ingested once, reused)")
    parser.add_argument("--users", type=int, default=None, help="a seeded sample of N test users (default: all)")
    parser.add_argument("--quick", action="store_true", help="small training for a smoke run")
    parser.add_argument("--pairs", default="rules", choices=PAIR_RECIPES, help="history pairs recipe every trainer uses")
    parser.add_argument("--task-lora", default=None, help="use this stored task LoRA instead of training bench-task-lora")
    parser.add_argument("--rag-ks", default="1,2,4", help="the k values RAG chooses from on training users")
    parser.add_argument("--rag-train-k", type=int, default=2, help="k of the task LoRA trained on RAG prompts (adapt --rag-k), served with the same k (a stored --task-lora-rag adapter's own k wins)")
    parser.add_argument("--rag-train-min-similarity", type=float, default=None, help="the task LoRA+RAG is trained on prompts that show only retrieved items at least this cosine-similar to the input (adapt --rag-min-similarity)")
    parser.add_argument("--rag-min-similarity", type=float, default=None, help="... and served with this threshold (evaluate --min-similarity; default: the training one)")
    parser.add_argument("--task-lora-rag", default=None, help="use this stored RAG-trained task LoRA instead of training one")
    parser.add_argument("--methods", default=",".join(GROUPS), help=f"which rows to run besides copy and k=0 (comma-separated of {', '.join(GROUPS)})")
    parser.add_argument("--decode", default="", help='decoding options of every evaluation, e.g. "--beams 4 --repetition-penalty 1.2" (chosen on dev users by benchmarks/decoding)')
    parser.add_argument("--reuse-history", default=None, help="also run each personal row with evaluate --reuse-history THRESHOLD, or 'auto': chosen on the training-split users against copying the input")
    parser.add_argument("--user-spellings", default=None, help="also run each personal row with evaluate --user-spellings MIN_COUNT (with --reuse-history too, when given), or 'auto': chosen on the training-split users against copying the input")
    parser.add_argument("--perpcs-history-format", default="task", choices=HISTORY_FORMATS, help="how Per-Pcs assembly reads the test users' history (assemble --history-format)")
    parser.add_argument("--perpcs-max-items", type=int, default=None, help="Per-Pcs assembles from each test user's N most recent items (assemble --max-items; default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/lamp/results-TASK[-quick]")
    args = parser.parse_args()
    started = time.perf_counter()
    out = args.out or Path(__file__).with_name(f"results-{args.task.lower()}{'-quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    size = settings(args.quick)
    prefix = "bench-quick" if args.quick else "bench"
    groups = set(args.methods.split(","))
    if groups - set(GROUPS):
        raise SystemExit(f"--methods: unknown {sorted(groups - set(GROUPS))}; expected some of {', '.join(GROUPS)}")
    similarity_suffix = f"-sim{args.rag_train_min_similarity:g}" if args.rag_train_min_similarity is not None else ""
    names = {"task_lora": args.task_lora or f"{prefix}-task-lora", "oppu": f"{prefix}-oppu", "pool": f"{prefix}-pool", "pplug": f"{prefix}-pplug",
             "task_lora_rag": args.task_lora_rag or f"{prefix}-task-lora-rag{args.rag_train_k}" + similarity_suffix,
             "rag_train_k": args.rag_train_k, "rag_train_min_similarity": args.rag_train_min_similarity, "rag_min_similarity": None,
             "perpcs_history_format": args.perpcs_history_format, "perpcs_max_items": args.perpcs_max_items}  # fmt: skip
    ingest(args.store, args.data, args.task)
    test_ids = split_ids(args.store, args.task, "test", args.users, args.seed, out)
    tune_ids = split_ids(args.store, args.task, "train", size["tune_users"], args.seed, out)
    timings: dict = {}
    train(args.store, args.task, size, test_ids, names, args.pairs, groups, timings)
    if "task-lora-rag" in groups:  # a stored adapter (--task-lora-rag) says itself what it was trained with
        config = stored_config(args.store, names["task_lora_rag"])
        names["rag_train_k"] = config.get("rag_k") or names["rag_train_k"]
        names["rag_train_min_similarity"] = config.get("rag_min_similarity")
        names["rag_min_similarity"] = names["rag_train_min_similarity"] if args.rag_min_similarity is None else args.rag_min_similarity
    decode = shlex.split(args.decode)
    rag_k, rag_scores = None, {}
    if "rag" in groups:
        rag_k, rag_scores = choose_rag_k(args.store, args.task, [int(k) for k in args.rag_ks.split(",")], tune_ids, decode)
    reuse_choice = choose_reuse(args.store, args.task) if args.reuse_history == "auto" else None
    reuse_threshold = reuse_choice["threshold"] if reuse_choice else None if args.reuse_history is None else float(args.reuse_history)
    spelling_choice = choose_spellings(args.store, args.task) if args.user_spellings == "auto" else None
    spelling_count = spelling_choice["min_count"] if spelling_choice else None if args.user_spellings is None else int(args.user_spellings)
    rows = with_history(plans(names, rag_k, groups), reuse_threshold, spelling_count)
    runs = evaluate_all(args.store, args.task, test_ids, rows, decode, out / "evaluations.json")
    by_measure = per_query_scores(args.store, args.task, runs)
    rag_label = next((label for label in runs if label.startswith("RAG") and "ablation" not in label), None)
    summary = summarize(by_measure, rag_label)
    if timings.get("perpcs_assembly_s_per_user") and timings.get("oppu_train_s_per_user"):
        timings["assembly_speedup_vs_oppu"] = round(timings["oppu_train_s_per_user"] / timings["perpcs_assembly_s_per_user"], 1)
    result = {
        "task": args.task, "data": str(args.data), "store": str(args.store), "quick": args.quick, "settings": size,
        "pairs": args.pairs, "decode": args.decode, "methods": sorted(groups), "names": names, "test_users": len(test_ids.read_text().split()), "runs": runs,
        "rag_k_chosen_on_train_users": rag_k, "rag_scores_on_train_users": rag_scores,
        "reuse_history": reuse_threshold, "reuse_chosen_on_train_users": reuse_choice,
        "user_spellings": spelling_count, "spellings_chosen_on_train_users": spelling_choice, "timings": timings, **summary,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    header = (f"{args.task}, {result['test_users']} test users ({summary['n_queries']} queries), "
              f"{'quick' if args.quick else 'full'} settings"
              + (f", pairs {args.pairs}" if groups - {"rag", "training-free"} else "")
              + f", decoding {args.decode or 'the task default'}"
              + (f"; RAG k={rag_k} chosen on {size['tune_users']} training users {rag_scores}" if "rag" in groups else "")
              + (f"; task LoRA+RAG trained and served with k={args.rag_train_k}" if "task-lora-rag" in groups else "")
              + (f", items shown at cosine >= {names['rag_train_min_similarity']} in training and >= {names['rag_min_similarity']} in serving"
                 if "task-lora-rag" in groups and names["rag_min_similarity"] is not None else "")
              + (f"; history reused at ROUGE-1 overlap >= {reuse_threshold}" if reuse_threshold is not None else "")
              + (f" (chosen on {reuse_choice['queries']} training-split queries against copying the input; cross-validated gain "
                 f"{reuse_choice['cross_validated']['held_out_gain_over_copy']:+.4f})" if reuse_choice else "")
              + (f"; user spellings of at least {spelling_count} uses" if spelling_count is not None else "")
              + (f" (chosen on {spelling_choice['queries']} training-split queries against copying the input; cross-validated gain "
                 f"{spelling_choice['cross_validated']['held_out_gain_over_copy']:+.4f})" if spelling_choice else "")
              + (f"; Per-Pcs assembled from the {args.perpcs_max_items} most recent items" if "perpcs" in groups and args.perpcs_max_items else "")
              + (f", read as {args.perpcs_history_format}" if "perpcs" in groups and args.perpcs_history_format != "task" else "")
              + (f"; timings {timings}" if timings else ""))  # fmt: skip
    (out / "results.md").write_text(markdown(summary, header), encoding="utf-8")
    chart(summary, out / "results.png")
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"benchmark finished in {result['wall_s']:.0f} s; {out}/results.json, .md, .png")


if __name__ == "__main__":
    main()
