"""Benchmark: `persona` ingest throughput against plain SentenceTransformer.encode on the same texts.

Each phase runs in its own process so its peak memory (max RSS) is its own:
  raw     SentenceTransformer.encode(all texts, same batch size, normalized), nothing else
  ingest  recipes.flows.ingest.ingest: validate the LaMP file, embed every item, write the LanceDB store
Goal (issue 2): ingest at least 85% of the raw encoder's items/s.

    .venv/bin/python benchmarks/ingest/run.py [--questions ../shared/data/lamp7/questions.json]
        [--task LaMP-7] [--batch-size 64] [--out benchmarks/ingest/results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_QUESTIONS = ROOT.parent / "shared" / "data" / "lamp7" / "questions.json"


def phase_raw(questions: Path, task_name: str, batch_size: int) -> dict:
    from recipes.kit.backbones import load_encoder
    from recipes.kit.inputs import read_lamp_questions
    from recipes.kit.tasks import get_task

    texts = [item.text for user in read_lamp_questions(questions, get_task(task_name)) for item in user.items]
    model = load_encoder(device="cpu").model
    model.encode(texts[:64], batch_size=batch_size)  # warm-up, as ingest's first chunk also pays it
    started = time.perf_counter()
    model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    seconds = time.perf_counter() - started
    return {"items": len(texts), "seconds": seconds}


def phase_ingest(questions: Path, task_name: str, batch_size: int) -> dict:
    from recipes.kit.backbones import load_encoder
    from recipes.flows.ingest import ingest, lamp_source
    from recipes.kit.tasks import get_task
    from store import Store

    encoder = load_encoder(device="cpu")
    encoder.model.encode(["warm up"] * 64, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        started = time.perf_counter()
        summary = ingest(store, lamp_source(questions, get_task(task_name)), encoder, batch_size=batch_size)
        seconds = time.perf_counter() - started
        users = store.count("users")
    return {"items": summary["items"], "users": users, "seconds": seconds}


def run_phase_in_child(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--phase", name, "--questions", str(args.questions),
               "--task", args.task, "--batch-size", str(args.batch_size)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="ingest throughput vs raw SentenceTransformer.encode")
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--task", default="LaMP-7")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--phase", choices=["raw", "ingest"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        run = phase_raw if args.phase == "raw" else phase_ingest
        result = run(args.questions, args.task, args.batch_size)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    if not args.questions.exists():
        sys.exit(f"{args.questions} not found: pass --questions PATH to a LaMP questions.json")
    raw = run_phase_in_child("raw", args)
    ing = run_phase_in_child("ingest", args)
    raw["items_per_s"] = raw["items"] / raw["seconds"]
    ing["items_per_s"] = ing["items"] / ing["seconds"]
    ratio = ing["items_per_s"] / raw["items_per_s"]
    report = {
        "benchmark": "ingest",
        "data": str(args.questions),
        "task": args.task,
        "batch_size": args.batch_size,
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "raw_encode": raw,
        "persona_ingest": ing,
        "ingest_over_raw": ratio,
        "goal": ">= 0.85",
        "goal_met": ratio >= 0.85,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"data: {args.questions} ({raw['items']} items), encoder all-MiniLM-L6-v2 on CPU, batch size {args.batch_size}")
    print(f"{'':28}{'items':>8}{'seconds':>10}{'items/s':>10}{'peak RSS MiB':>14}")
    for label, r in (("SentenceTransformer.encode", raw), ("persona ingest", ing)):
        print(f"{label:28}{r['items']:>8}{r['seconds']:>10.1f}{r['items_per_s']:>10.1f}{r['peak_rss_mib']:>14.0f}")
    print(f"ingest / raw throughput: {ratio:.1%} (goal >= 85%: {'met' if ratio >= 0.85 else 'NOT met'}); written to {args.out}")


if __name__ == "__main__":
    main()
