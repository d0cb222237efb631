"""Benchmark: batched greedy generation, examples/s at batch 1, 4 and 16 on the same LaMP-7 queries,
for every way a method changes the LLM per user, in mixed-user batches.

One process, one model load, the same prompts (LaMP-7 inputs, k=0, the task's 64 new tokens) for
every batch size, so only batching differs. `--kinds` picks what each prompt carries, prompt i
belonging to user i mod 16: `bare` (prompt methods, task-lora: nothing per row), `lora-r8` (OPPU:
each user's own rank-8 LoRA on q/k/v/o through per-row hooks), `pool-k3` (Per-Pcs and
peft-retrieval: each user mixes 3 of a 19-sharer pool's rank-8 pieces per module, served by
`PoolRows` from the shared pool), `lora-r24` (the same mixes served as each row's own rank-24
adapter by `RowLora`, how Per-Pcs was served before; a reference, outside the goal), `soft`
(PPlug: one soft token per prompt), `steer` (style-vector: a vector added at the middle layer).
The per-user parts are random and small (the answers stay the base model's, so every kind
generates about the same tokens). Also counts how many answers are identical to batch 1's. Goal:
batch 16 at least 4x the examples/s of batch 1 for every kind a method serves with. Every (kind,
batch size) runs --repeats times, interleaved (the order of kinds rotates and the batch sizes
reverse on each repeat) and its median time is reported, with each repeat's own speedup (its two
batch sizes ran back to back): this machine's speed drifts by 10-20% within minutes, more than the
per-row edits cost.

    .venv/bin/python benchmarks/generation/run.py [--questions ../shared/data/lamp7/questions.json]
        [--n 64] [--batch-sizes 1 4 16] [--repeats 3] [--kinds bare lora-r8 pool-k3 lora-r24 soft steer] [--out benchmarks/generation/results.json]
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
DEFAULT_QUESTIONS = ROOT.parent / "shared" / "data" / "lamp7" / "questions.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--n", type=int, default=64, help="queries (the first N of the file)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every (kind, batch size); medians are reported")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
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
    per_rows = {kind: KINDS[kind](llm, len(prompts)) for kind in args.kinds}
    runs: dict[tuple[str, int], list[tuple[float, list[str]]]] = {}
    for repeat in range(args.repeats):
        order = args.kinds[repeat % len(args.kinds):] + args.kinds[: repeat % len(args.kinds)]
        for kind in order:
            for batch_size in args.batch_sizes[:: -1 if repeat % 2 else 1]:
                runs.setdefault((kind, batch_size), []).append(timed(llm, prompts, task.max_new_tokens, batch_size, per_rows[kind]))
                print(f"repeat {repeat + 1} {kind} batch {batch_size}: {runs[kind, batch_size][-1][0]:.1f} s", file=sys.stderr, flush=True)
    kinds = {}
    for kind in args.kinds:
        rows = summarize(llm, len(prompts), {b: runs[kind, b] for b in args.batch_sizes})
        kinds[kind] = {
            "rows": rows, "speedup": rows[-1]["speedup"], "speedup_paired_median": statistics.median(rows[-1]["speedup_each_repeat"]),
            "goal_met": rows[-1]["speedup"] >= 4.0, "serves_a_method": kind not in REFERENCE,
        }  # fmt: skip
    result = {
        "benchmark": "generation",
        "data": f"{args.questions} (first {len(prompts)} LaMP-7 queries, k=0 prompts, 16 users per batch)",
        "model": llm.id,
        "device": str(llm.device),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "max_new_tokens": task.max_new_tokens,
        "kinds": kinds,
        "goal": f"batch {args.batch_sizes[-1]} >= 4x batch {args.batch_sizes[0]} for every kind a method serves with",
        "goal_met": all(k["goal_met"] for k in kinds.values() if k["serves_a_method"]),
    }
    print(f"\nLaMP-7, {len(prompts)} queries, {llm.id} on {llm.device} ({torch.get_num_threads()} threads), greedy, max {task.max_new_tokens} new tokens")
    print(f"{'kind':>9} {'batch':>5} {'seconds':>8} {'examples/s':>11} {'tokens/s':>9} {'speedup':>8} {'same answers':>13}")
    for kind, found in kinds.items():
        for r in found["rows"]:
            print(f"{kind:>9} {r['batch_size']:>5} {r['seconds']:>8} {r['examples_per_s']:>11} {r['new_tokens_per_s']:>9} {r['speedup']:>7}x {r['same_answers_as_first']:>6}/{r['examples']}")
    print(f"goal {result['goal']}: {'met' if result['goal_met'] else 'NOT met'}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


def timed(llm, prompts: list[str], max_new_tokens: int, batch_size: int, per_row) -> tuple[float, list[str]]:
    """Seconds to answer every prompt at this batch size, and the answers."""
    from recipes.kit.generation import generate

    started = time.perf_counter()
    answers = generate(llm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, per_row=per_row)
    return time.perf_counter() - started, answers


def summarize(llm, n: int, runs: dict[int, list[tuple[float, list[str]]]]) -> list[dict]:
    """Per batch size: the median seconds over the repeats, examples/s, speedup over the first
    size, and how many answers equal the first size's (every repeat's)."""
    reference = next(iter(runs.values()))[0][1]
    rows = []
    for batch_size, measured in runs.items():
        seconds = statistics.median(t for t, _ in measured)
        answers = measured[0][1]
        tokens = sum(len(llm.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        rows.append(
            {
                "batch_size": batch_size,
                "examples": n,
                "seconds": round(seconds, 2),
                "seconds_each_repeat": [round(t, 2) for t, _ in measured],
                "examples_per_s": round(n / seconds, 3),
                "new_tokens_per_s": round(tokens / seconds, 1),
                "same_answers_as_first": min(sum(a == b for a, b in zip(got, reference)) for _, got in measured),
            }
        )
    base = rows[0]["examples_per_s"]
    for row in rows:
        row["speedup"] = round(row["examples_per_s"] / base, 2)
        # each repeat ran the batch sizes of a kind back to back: their ratio within a repeat is paired in time
        row["speedup_each_repeat"] = [round(a / b, 2) for a, b in zip(rows[0]["seconds_each_repeat"], row["seconds_each_repeat"])]
    return rows


USERS = 16


def _bare(llm, n: int):
    from recipes.kit.row_edits import PerRow

    return PerRow()


def _loras(rank: int):
    def make(llm, n: int):
        from recipes.kit.lora import LoraWeights
        from recipes.kit.row_edits import PerRow
        from recipes.kit.row_lora import RowLora

        adapters = []
        for user in range(USERS):
            generator = torch.Generator().manual_seed(user)
            modules = {}
            for path, module in llm.model.named_modules():
                if path.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) and isinstance(module, torch.nn.Linear):
                    out_f, in_f = module.weight.shape
                    modules[path] = (torch.randn(rank, in_f, generator=generator) * 1e-3, torch.randn(out_f, rank, generator=generator) * 1e-3)
            adapters.append(LoraWeights(modules, {path: 1.0 for path in modules}))
        return PerRow(edit=RowLora(llm.model, [adapters[i % USERS] for i in range(n)]))

    return make


SHARERS, RANK, TOP_K = 19, 8, 3


def _pool_mixes(llm):
    """A pool of SHARERS random rank-RANK pieces per q/k/v/o module, and per user a softmax-weighted
    choice of TOP_K of them per module (as Per-Pcs stores an assembly)."""
    generator = torch.Generator().manual_seed(0)
    pieces = {}
    for path, module in llm.model.named_modules():
        if path.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) and isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            pieces[path] = (torch.randn(SHARERS, RANK, in_f, generator=generator) * 1e-3, torch.randn(SHARERS, out_f, RANK, generator=generator) * 1e-3)
    mixes = []
    for _ in range(USERS):
        mix = {}
        for path in pieces:
            chosen = torch.randperm(SHARERS, generator=generator)[:TOP_K]
            mix[path] = torch.zeros(SHARERS).index_put_((chosen,), torch.softmax(torch.randn(TOP_K, generator=generator), 0))
        mixes.append(mix)
    return pieces, mixes


def _pool_k3(llm, n: int):
    from recipes.kit.pool_rows import PoolRows
    from recipes.kit.row_edits import PerRow

    pieces, mixes = _pool_mixes(llm)
    return PerRow(edit=PoolRows(llm.model, pieces, [mixes[i % USERS] for i in range(n)]))


def _pool_as_row_loras(llm, n: int):
    from recipes.kit.lora import LoraWeights, mix_pieces
    from recipes.kit.row_edits import PerRow
    from recipes.kit.row_lora import RowLora

    pieces, mixes = _pool_mixes(llm)
    adapters = []
    for mix in mixes:
        modules = {}
        for path, weights in mix.items():
            chosen = weights.nonzero().flatten()
            modules[path] = mix_pieces(pieces[path][0][chosen], pieces[path][1][chosen], weights[chosen])
        adapters.append(LoraWeights(modules, {path: 1.0 for path in modules}))
    return PerRow(edit=RowLora(llm.model, [adapters[i % USERS] for i in range(n)]))


def _soft(llm, n: int):
    from recipes.kit.row_edits import PerRow
    from recipes.kit.soft_prompts import SoftTokens, token_norm

    vectors = torch.randn(USERS, 1, llm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    vectors = vectors / vectors.norm(dim=-1, keepdim=True) * token_norm(llm)
    return PerRow(soft=SoftTokens(vectors[[i % USERS for i in range(n)]]))


def _steer(llm, n: int):
    from recipes.kit.row_edits import PerRow
    from recipes.methods.style_vector import RowSteering, steered_layer

    vectors = torch.randn(USERS, llm.model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 1e-3
    return PerRow(edit=RowSteering(llm.model, steered_layer(llm, -1), vectors[[i % USERS for i in range(n)]]))


REFERENCE = {"lora-r24"}  # no method serves this way any more: measured for comparison
KINDS = {"bare": _bare, "lora-r8": _loras(8), "pool-k3": _pool_k3, "lora-r24": _pool_as_row_loras, "soft": _soft, "steer": _steer}


if __name__ == "__main__":
    main()
