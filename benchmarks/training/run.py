"""Benchmark: every trainer's tokens/s on real LaMP-7 pairs against a bare torch loop at the same shapes.

For each trainer, in one run on one loaded LLM and the same data:

- `adapt` (task LoRA): the training-split users' (prompt, gold) pairs, the CLI's defaults (batch 8).
- `oppu` (one user's LoRA, also a Per-Pcs sharer's LoRA): the training user with the longest
  history, language modelling on their tweets (batch 4).
- `gates` (a Per-Pcs sharer's gates, LoRA frozen): the same user, the LoRA just trained (batch 4).
- `pplug` (the user embedder, LLM frozen): the training-split pairs with each user's history
  vectors (batch 8).

the trainer itself runs `--steps` optimizer steps (its own code: tokenization, batching, the
shared training loop, progress), and a bare loop runs the same number of steps over the very
same rows: right-padded full sequences, `model(input_ids, attention_mask, labels).loss`,
backward, AdamW. For the LoRA trainers (and the gates, whose gradients flow through the same
layers) the bare loop trains a peft LoRA of the same rank on the same modules; for PPlug it
back-propagates through the frozen LLM to two soft input vectors (the embedder's own input
encoder is PPlug's extra cost, not counted in the bare loop). Tokens are the rows' real
tokens (no padding), counted the same way on both sides. Each pair runs in float32 and, where
the CPU (or GPU) has it, in bfloat16 autocast. Peak resident memory is measured per trainer
(the kernel's high-water mark, reset before each), and resident memory after every step
gives the growth over the run (RSS at the end against RSS after the first tenth of the steps).
`--skip-bare --steps 500` checks memory over a long run (every step's RSS goes in the JSON).

    .venv/bin/python benchmarks/training/run.py --lamp ../shared/data/lamp7 [--steps 30]
        [--store .persona-bench/lamp7] [--trainers adapt,oppu,gates,pplug] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TRAINERS = ("adapt", "oppu", "gates", "pplug")
GOAL = 0.70  # issue 19: each trainer at least 70% of the bare loop's tokens/s


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def reset_peak() -> None:
    """Reset the kernel's resident high-water mark (VmHWM) of this process (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class MemoryTrace:
    """A progress callback that records resident memory after every training step."""

    def __init__(self) -> None:
        self.samples: list[int] = []

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        if done > len(self.samples):
            self.samples.append(rss_bytes())

    def growth(self) -> float:
        """RSS at the end over RSS after the first tenth of the steps, minus one."""
        if len(self.samples) < 10:
            return 0.0
        settled = self.samples[max(1, len(self.samples) // 10) - 1]
        return self.samples[-1] / settled - 1


# ---------- data ----------


def open_store(store_path: Path, lamp: Path):
    """The LaMP-7 users in a store of their own (ingested once, reused by later runs)."""
    from recipes.kit.backbones import load_encoder
    from recipes.flows.ingest import ingest, lamp_source
    from recipes.kit.tasks import get_task
    from store import Store

    store = Store(str(store_path))
    if not store.list_users():
        task = get_task("LaMP-7")
        started = time.perf_counter()
        counts = ingest(store, lamp_source(lamp / "questions.json", task, lamp / "outputs.json"), lambda: load_encoder(None, "cpu"))
        print(f"ingested {counts['users']} users, {counts['items']} items into {store_path} in {time.perf_counter() - started:.0f} s")
    return store


# ---------- bare loops ----------


def padded(rows: list[tuple[list[int], list[int]]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded full rows: what a plain training loop hands the model."""
    width = max(len(ids) for ids, _ in rows)
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=device),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows], device=device),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows], device=device),
    }


def timed_steps(llm, batches: list[list[tuple[list[int], list[int]]]], optimizer, loss_of: Callable, dtype) -> tuple[float, int]:
    """The plain loop both bare trainers share: pad, forward under autocast, backward, AdamW step;
    seconds and real tokens."""
    started, tokens = time.perf_counter(), 0
    for rows in batches:
        batch = padded(rows, llm.tokenizer.pad_token_id, llm.device)
        with torch.autocast(llm.device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(len(ids) for ids, _ in rows)
    return time.perf_counter() - started, tokens


def bare_lora(llm, batches: list[list[tuple[list[int], list[int]]]], r: int, targets: list[str], dtype) -> tuple[float, int]:
    """Plain peft LoRA training over these batches: seconds and tokens."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(llm.model, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    try:
        return timed_steps(llm, batches, optimizer, lambda batch: model(**batch).loss, dtype)
    finally:
        model.unload()
        llm.model.eval()
        for parameter in llm.model.parameters():
            parameter.requires_grad_(False)


def bare_soft(llm, batches: list[list[tuple[list[int], list[int]]]], start: int, n_soft: int, dtype) -> tuple[float, int]:
    """The frozen LLM back-propagating to `n_soft` trainable input vectors per row: seconds and tokens."""
    embed = llm.model.get_input_embeddings()
    soft = torch.nn.Parameter(torch.zeros(n_soft, embed.weight.shape[1], device=llm.device))
    optimizer = torch.optim.AdamW([soft], lr=1e-4)
    llm.model.train()

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        embeds = embed(batch["input_ids"])
        rows = len(embeds)
        embeds = torch.cat([embeds[:, :start], soft.expand(rows, -1, -1).to(embeds.dtype), embeds[:, start + n_soft :]], dim=1)
        return llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    try:
        return timed_steps(llm, batches, optimizer, loss, dtype)
    finally:
        llm.model.eval()


# ---------- one trainer against its bare loop ----------


def measure_pair(name: str, run_trainer: Callable, run_bare: Callable | None) -> dict:
    """Run the trainer, then its bare loop (None: memory only), each with a fresh peak-memory mark."""
    from recipes.kit.training_loop import release_freed_memory

    release_freed_memory()
    reset_peak()
    trace = MemoryTrace()
    seconds, tokens, steps = run_trainer(trace)
    ours = {"seconds": round(seconds, 2), "tokens": tokens, "steps": steps, "tokens_per_s": round(tokens / seconds, 1),
            "s_per_step": round(seconds / steps, 3), "peak_rss_mb": round(peak_bytes() / 2**20),
            "rss_growth": round(trace.growth(), 4)}  # fmt: skip
    if run_bare is None:
        print(f"  {name:<6} persona {ours['tokens_per_s']:>8,.0f} tok/s ({ours['s_per_step']:.2f} s/step, peak {ours['peak_rss_mb']:,} MB,"
              f" growth {100 * ours['rss_growth']:+.1f}%)", flush=True)  # fmt: skip
        return {"persona": ours, "rss_mb": [round(b / 2**20) for b in trace.samples]}
    release_freed_memory()
    reset_peak()
    bare_seconds, bare_tokens = run_bare()
    bare = {"seconds": round(bare_seconds, 2), "tokens": bare_tokens, "tokens_per_s": round(bare_tokens / bare_seconds, 1),
            "s_per_step": round(bare_seconds / steps, 3), "peak_rss_mb": round(peak_bytes() / 2**20)}  # fmt: skip
    ratio = ours["tokens_per_s"] / bare["tokens_per_s"]
    print(f"  {name:<6} persona {ours['tokens_per_s']:>8,.0f} tok/s ({ours['s_per_step']:.2f} s/step, peak {ours['peak_rss_mb']:,} MB,"
          f" growth {100 * ours['rss_growth']:+.1f}%)   bare {bare['tokens_per_s']:>8,.0f} tok/s   ratio {ratio:.2f}", flush=True)  # fmt: skip
    return {"persona": ours, "bare": bare, "ratio": round(ratio, 3), "goal_met": ratio >= GOAL}


def run_all(store, llm, encoder, trainers: list[str], steps: int, precision: str, skip_bare: bool = False) -> dict:
    from recipes.methods.perpcs.gates import GateSettings, train_gates
    from recipes.kit.training_loop import (
        Example, LoraSettings, TokenizedExamples, autocast_dtype, batch_order, encode_example, train_lora,
    )  # fmt: skip
    from recipes.kit.lora import find_target_modules
    from recipes.methods.pplug.training import PPlugSettings, build_embedder, history_vectors, pplug_examples, train_embedder
    from recipes.kit.soft_prompts import soft_start
    from recipes.kit.tasks import get_task
    from recipes.kit.training_data import history_examples, query_examples, split_queries

    task = get_task("LaMP-7")
    dtype = autocast_dtype(llm, precision)
    train_queries = split_queries(store, task, "train")
    pairs = query_examples(train_queries)
    train_users = sorted({q.user_id for q in train_queries})
    histories = store.histories(train_users, task.name)
    sharer = max(train_users, key=lambda u: len(histories.get(u, [])))
    sharer_examples = history_examples(task, histories[sharer])
    targets = find_target_modules(llm.model)
    results: dict[str, dict] = {}
    shared: dict[str, object] = {}

    def measure(name: str, run_trainer: Callable, run_bare: Callable) -> dict:
        return measure_pair(name, run_trainer, None if skip_bare else run_bare)

    def lora_rows(examples: list[Example], settings) -> list[list[tuple[list[int], list[int]]]]:
        data = TokenizedExamples(llm, examples, settings.max_length)
        plan = batch_order(len(examples), steps, settings.batch_size, settings.seed, data.lengths)
        return [[data.rows[i] for i in batch] for batch in plan]

    def lora_trainer(examples: list[Example], settings, keep: bool = False):
        def run(trace):
            trained = train_lora(llm, examples, settings, progress=trace)
            if keep:
                shared["lora"] = trained.weights
            return trained.seconds, trained.tokens, trained.steps

        return run

    for name in trainers:
        if name == "adapt":
            settings = LoraSettings(learning_rate=2e-3, batch_size=8, steps=steps, precision=precision)
            results[name] = measure(name, lora_trainer(pairs, settings), lambda: bare_lora(llm, lora_rows(pairs, settings), 8, targets, dtype))
        elif name in ("oppu", "gates"):
            settings = LoraSettings(learning_rate=1e-3, batch_size=4, steps=steps, precision=precision)
            if name == "oppu" or "lora" not in shared:
                oppu = measure("oppu", lora_trainer(sharer_examples, settings, keep=True),
                               lambda: bare_lora(llm, lora_rows(sharer_examples, settings), 8, targets, dtype))  # fmt: skip
                if name == "oppu":
                    results[name] = oppu
            if name == "gates":
                gates = GateSettings(steps=steps, batch_size=4, precision=precision)

                def run_gates(trace):
                    trained = train_gates(llm, shared["lora"], sharer_examples, gates, progress=trace)
                    return trained.seconds, trained.tokens, steps

                results[name] = measure(name, run_gates, lambda: bare_lora(llm, lora_rows(sharer_examples, gates), 8, targets, dtype))
        elif name == "pplug":
            settings = PPlugSettings(batch_size=8, steps=steps, precision=precision, eval_every=steps)
            vectors = history_vectors(store, task, train_users, settings.history_cap)
            examples = pplug_examples(task, train_queries, vectors, False, settings.seed)

            def run_pplug(trace):
                embedder = build_embedder(encoder, llm, settings)
                trained = train_embedder(llm, embedder, examples, [], vectors, settings, progress=trace)
                return trained.seconds, trained.tokens, trained.steps

            def pplug_rows():
                start = soft_start(llm)
                plan = batch_order(len(examples), steps, settings.batch_size, settings.seed, [len(e.prompt) + len(e.target) for e in examples])
                rows = []
                for batch in plan:
                    encoded = [encode_example(llm, Example(examples[i].prompt, examples[i].target), settings.max_length - 2) for i in batch]
                    rows.append([(ids[:start] + [0, 0] + ids[start:], labels[:start] + [-100, -100] + labels[start:]) for ids, labels in encoded])
                return rows

            results[name] = measure(name, run_pplug, lambda: bare_soft(llm, pplug_rows(), soft_start(llm), 2, dtype))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lamp", type=Path, default=ROOT.parent / "shared" / "data" / "lamp7", help="LaMP-7 folder (questions.json, outputs.json)")
    parser.add_argument("--store", type=Path, default=ROOT / ".persona-bench" / "lamp7", help="store of the LaMP-7 users (ingested once)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each trainer and each bare loop")
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    parser.add_argument("--precisions", default="auto", help="auto: float32, plus bfloat16 where the hardware has it")
    parser.add_argument("--skip-bare", action="store_true", help="only the trainers (speed, memory over the run): a long memory check")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    if not (args.lamp / "questions.json").exists():
        sys.exit(f"no LaMP-7 data at {args.lamp} (questions.json, outputs.json)")
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = [t for t in trainers if t not in TRAINERS]
    if unknown:
        sys.exit(f"--trainers: unknown {unknown[0]}; expected some of {', '.join(TRAINERS)}")

    from recipes.kit.backbones import load_encoder, load_llm
    from recipes.kit.training_loop import autocast_dtype

    store = open_store(args.store, args.lamp)
    llm = load_llm(None, args.device)
    encoder = load_encoder(None, args.device)
    precisions = ["float32"] + (["bfloat16"] if autocast_dtype(llm, "auto") is not None else [])
    if args.precisions != "auto":
        precisions = [p.strip() for p in args.precisions.split(",")]
    results = {
        "task": "LaMP-7", "data": str(args.lamp), "steps": args.steps, "goal": f"persona / bare >= {GOAL}",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": args.device,
                    "bfloat16": autocast_dtype(llm, "auto") is not None},
        "precisions": {},
    }  # fmt: skip
    for precision in precisions:
        print(f"{precision}, {args.steps} steps each, {torch.get_num_threads()} threads:", flush=True)
        results["precisions"][precision] = run_all(store, llm, encoder, trainers, args.steps, precision, args.skip_bare)
    results["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
