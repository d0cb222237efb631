"""Do per-user adapters learn their user? The gold answer's likelihood says what ROUGE cannot.

On LaMP-7, OPPU's and Per-Pcs's answers barely differ from their ablations' (beam search keeps
copying the input), so ROUGE cannot tell whether an adapter learned anything about its user.
This measures the mean negative log-likelihood per target token (end of text included) of each
user's gold answer to their query, teacher-forced, under:
- base: the adapters' base alone (the task LoRA: OPPU's ablation);
- ablation: Per-Pcs only: its uniform gates (every sharer's pieces, equal weights);
- own: the user's own adapter over the base (OPPU: their trained LoRA; Per-Pcs: their stored
  assembly), as `evaluate` serves it;
- donor: another user's adapter (a seeded derangement, as `--ablation` draws donors);
- own - mean, donor - mean: the same adapters less the mean adapter of every user measured (the
  drift all adapters share: what training on anyone's history pairs moves, not the user).
It prints and writes each condition's mean NLL and the paired differences per query with
bootstrap 95% intervals. Lower is better; own below donor means the adapter holds something of
its own user. No generation, so it runs in minutes on CPU.

    .venv/bin/python benchmarks/lamp/adapter_likelihood.py --store .persona-bench/lamp7 \\
        (--oppu GROUP | --perpcs POOL) --users benchmarks/lamp/results-lamp-7-oppu-perpcs/test_users.txt \\
        [--split test] [--task LaMP-7] [--seed 0] [--out benchmarks/lamp/adapter-likelihood-lamp-7-METHOD.json]
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

DIFFERENCES = (
    ("own", "base"), ("own", "ablation"), ("donor", "base"), ("own", "donor"),
    ("own - mean", "base"), ("donor - mean", "base"), ("own - mean", "donor - mean"),
)  # fmt: skip


def dense_deltas(adapter) -> dict[str, torch.Tensor]:
    """Every module's update scale·B·A, dense."""
    return {path: adapter.delta(path) for path in adapter.modules}


class Shifted:
    """Adds a dense update to the model's weights for the length of a `with`, then restores them exactly."""

    def __init__(self, model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> None:
        self.model, self.deltas, self.saved = model, deltas, {}

    def __enter__(self) -> None:
        for path, delta in self.deltas.items():
            weight = self.model.get_submodule(path).weight
            self.saved[path] = weight.detach().clone()
            weight += delta.to(weight.dtype)

    def __exit__(self, *_: object) -> None:
        for path, weight in self.saved.items():
            self.model.get_submodule(path).weight.copy_(weight)


def personal_adapters(store, task, users: list[str], group: str | None, pool_ref: str | None) -> tuple[dict, str | None, object]:
    """Each user's adapter (OPPU group `group`, or their Per-Pcs assembly against `pool_ref`), the
    base it sits on, and the method's non-personal adapter where it has one (Per-Pcs's uniform gates)."""
    from recipes.kit.plugins import lora_weights
    from recipes.methods.perpcs.pool import decode_choices, mixed_lora, read_pool, uniform_choices

    if group:
        plugins = store.get_plugins([f"{group}/{u}" for u in users])
        if len(plugins) < len(users):
            sys.exit(f"{len(users) - len(plugins)} users have no adapter in group '{group}'")
        bases = {p.base for p in plugins.values()}
        if len(bases) != 1:
            sys.exit(f"the adapters of group '{group}' sit on different bases: {sorted(map(str, bases))}")
        return {u: lora_weights(plugins[f"{group}/{u}"]) for u in users}, bases.pop(), None
    version = store.resolve_pool(pool_ref)
    pool = read_pool(store, task.name, version)
    records = store.get_assemblies(task.name, users, version.version)
    if len(records) < len(users):
        sys.exit(f"{len(users) - len(records)} users have no assembly against pool {pool.label}")
    return {u: mixed_lora(pool, decode_choices(pool, records[u].choice)) for u in users}, pool.base, mixed_lora(pool, uniform_choices(pool))


def gold_nll(llm, prompt: str, gold: str) -> float:
    """Mean NLL per target token of `gold` after `prompt`, in the LLM's chat format."""
    from recipes.kit.training_loop import Example, TokenizedExamples, causal_loss

    batch = TokenizedExamples(llm, [Example(prompt, gold)], 1024).batch([0], share_prefix=False)
    with torch.inference_mode():
        return float(causal_loss(llm.model, batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--oppu", metavar="GROUP", help="OPPU adapters: their name prefix (train-oppu --name)")
    which.add_argument("--perpcs", metavar="POOL", help="Per-Pcs: the users' stored assemblies against this pool version or tag")
    parser.add_argument("--users", type=Path, required=True, help="file with one user id per line (at least 2)")
    parser.add_argument("--split", default="test", help="the split whose query each user answers")
    parser.add_argument("--task", default="LaMP-7")
    parser.add_argument("--seed", type=int, default=0, help="seeds the donors")
    parser.add_argument("--out", type=Path, default=None, help="default: adapter-likelihood-lamp-7-METHOD.json beside this script")
    args = parser.parse_args()
    method = "oppu" if args.oppu else "perpcs"
    out = args.out or Path(__file__).with_name(f"adapter-likelihood-{args.task.lower()}-{method}.json")

    from recipes.kit.backbones import load_llm
    from recipes.kit.metrics import bootstrap_interval
    from recipes.kit.plugins import apply_chain, base_chain
    from recipes.kit.retrieval import donors
    from recipes.kit.splits import query_split
    from recipes.kit.tasks import get_task
    from store import Store

    started = time.perf_counter()
    store, task = Store(args.store), get_task(args.task)
    users = [line.strip() for line in args.users.read_text(encoding="utf-8").splitlines() if line.strip()]
    wanted = set(users)
    queries = {q.user_id: q for q in store.task_queries(task.name) if q.user_id in wanted and query_split(q.split, q.user_id) == args.split and q.output}
    missing = [u for u in users if u not in queries]
    if missing:
        sys.exit(f"{len(missing)} users have no {args.split} query with a gold answer, e.g. '{missing[0]}'")
    adapters, base, ablation = personal_adapters(store, task, users, args.oppu, args.perpcs)
    llm = load_llm(None, "cpu")
    apply_chain(llm, base_chain(store, base))
    llm.model.eval()

    mean: dict[str, torch.Tensor] = {}
    for adapter in adapters.values():
        for path, delta in dense_deltas(adapter).items():
            mean[path] = mean[path] + delta if path in mean else delta
    mean = {path: total / len(users) for path, total in mean.items()}
    donor_of = donors(users, args.seed, method)
    ablation_deltas = dense_deltas(ablation) if ablation else None

    rows = []
    for n, user in enumerate(users, 1):
        query = queries[user]
        own, donor = dense_deltas(adapters[user]), dense_deltas(adapters[donor_of[user]])
        shifts = {"base": {}, **({"ablation": ablation_deltas} if ablation_deltas else {}), "own": own, "donor": donor,
                  "own - mean": {p: d - mean[p] for p, d in own.items()}, "donor - mean": {p: d - mean[p] for p, d in donor.items()}}  # fmt: skip
        row = {"user": user, "donor_user": donor_of[user]}
        for condition, deltas in shifts.items():
            with Shifted(llm.model, deltas):
                row[condition] = gold_nll(llm, query.input, query.output)
        rows.append(row)
        print(f"\r{n}/{len(users)} users", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    conditions = [c for c in rows[0] if c not in ("user", "donor_user")]
    means = {c: statistics.fmean(r[c] for r in rows) for c in conditions}
    differences = {}
    for a, b in [(a, b) for a, b in DIFFERENCES if a in conditions and b in conditions]:
        values = [r[a] - r[b] for r in rows]
        low, high = bootstrap_interval(values, seed=args.seed)
        differences[f"{a} vs {b}"] = {"mean": statistics.fmean(values), "ci95": [low, high], "lower_for": sum(v < 0 for v in values)}
    result = {
        "task": task.name, "store": args.store, "method": method, "adapters": args.oppu or args.perpcs, "base": base, "split": args.split, "users": len(users),
        "seed": args.seed, "metric": "mean NLL per gold token (nats), teacher-forced; lower is better",
        "mean_nll": means, "paired_differences": differences, "per_user": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    print(f"{task.name}, {len(users)} {args.split} users, {method} adapters {args.oppu or args.perpcs} over {base}: mean NLL per gold token")
    for condition in conditions:
        print(f"  {condition:<14} {means[condition]:.4f}")
    for name, d in differences.items():
        verdict = "lower" if d["ci95"][1] < 0 else "higher" if d["ci95"][0] > 0 else "not separable"
        print(f"  {name:<28} {d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]  {verdict}  (lower for {d['lower_for']} of {len(rows)})")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
