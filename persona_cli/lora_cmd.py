"""`persona adapt` (the task LoRA) and `persona train-oppu` (one LoRA per user)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from persona_cli.common import (
    console, handle_errors, human_bytes, lora_settings, named_users, resolve_base, open_store, print_json, progress_bar, store_encoder,
)  # fmt: skip
from persona_cli.options import (
    AlphaOption, AutoBaseOption, DeviceOption, DropoutOption, JsonOption, LlmOption, MaxLengthOption, MaxMinutesOption, PairsOption, PrecisionOption,
    ROption, SeedOption, TargetsOption, TaskOption,
)  # fmt: skip

@handle_errors
def adapt(
    ctx: typer.Context,
    task: str = TaskOption,
    name: Optional[str] = typer.Option(None, "--name", help="Plug-in name (default: task-lora-TASK)."),
    base: Optional[str] = typer.Option(None, "--base", help="Train on top of this stored plug-in."),
    r: int = ROption,
    alpha: float = AlphaOption,
    dropout: float = DropoutOption,
    target_modules: Optional[str] = TargetsOption,
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (linear warm-up and decay)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: --epochs passes)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the examples (default auto: 4 over small data, at most 2,400 examples drawn over large data)."),
    max_length: int = MaxLengthOption,
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Score the dev split every N steps (default: 8 times in all); the best step is kept."),
    max_minutes: Optional[float] = MaxMinutesOption,
    select: str = typer.Option("loss", "--select", help="loss (dev loss) or metric (the task's first metric on the dev queries, e.g. ROUGE-1; slower)."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Train on at most N training-split queries."),
    pairs: str = PairsOption,
    rag_k: int = typer.Option(0, "--rag-k", help="Show each training prompt the user's K history items BM25 ranks highest, as `--method rag --k K` serves them (0: none); serve with `evaluate --method rag --k K --base NAME`."),
    rag_min_similarity: Optional[float] = typer.Option(None, "--rag-min-similarity", help="With --rag-k: show only retrieved items whose cosine similarity to the input (the store's encoder) is at least this; serve with the same --min-similarity."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a stored plug-in of that name."),
    seed: int = SeedOption,
    precision: str = PrecisionOption,
    llm: Optional[str] = LlmOption,
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """Train the task LoRA on training-split users' (prompt, gold) pairs (with --pairs rules, their
    history items made into pairs too); the dev split picks the best step.

    An interrupted run resumes from its last checkpoint when started again with the same options."""
    from recipes.kit.backbones import load_llm
    from recipes.kit.tasks import get_task
    from recipes.methods.task_lora import adapt_task, task_lora_name

    store = open_store(ctx)
    task_spec = get_task(task)
    settings = lora_settings(
        target_modules, r=r, alpha=alpha, dropout=dropout, learning_rate=lr, batch_size=batch_size, steps=steps,
        epochs=epochs, max_length=max_length, eval_every=eval_every, seed=seed, precision=precision, max_minutes=max_minutes,
    )  # fmt: skip
    with progress_bar(enabled=not json_out) as tick:
        plugin = adapt_task(
            store, lambda: load_llm(llm, device), task_spec, settings, name or task_lora_name(task_spec), base, replace,
            max_examples, tick, select, pairs, rag_k, rag_min_similarity=rag_min_similarity,
            encoder=store_encoder(store, None, device),
        )  # fmt: skip
    summary = {k: v for k, v in plugin.metrics.items() if k != "curve"}
    if json_out:
        print_json({"name": plugin.name, "kind": plugin.kind, "task": plugin.task, "base": plugin.base, "llm": plugin.llm, **summary,
                    "train_examples": plugin.config["train_examples"], "history_pairs": plugin.config["history_pairs"],
                    "dev_examples": plugin.config["dev_examples"]})
        return
    resumed = f", resumed at step {summary['resumed_from']}" if summary.get("resumed_from") else ""
    if summary.get("ignored_checkpoint"):
        console.print(f"[yellow]{summary['ignored_checkpoint']}[/]")
    console.print(
        f"stored plug-in [bold]{plugin.name}[/] ({human_bytes(plugin.metrics['adapter_bytes'])}): "
        f"{plugin.config['train_examples']} examples of {plugin.config['train_users']} training users"
        + (f" ({plugin.config['history_pairs']} of them history pairs)" if plugin.config["history_pairs"] else "") + ", "
        f"{summary['steps']} steps in {summary['train_seconds']:.1f} s{resumed}; "
        f"final loss {summary['final_loss']}; kept step {summary['best_step']} (dev loss {summary['best_dev_loss']}"
        + (f", dev {get_task(task).metric_names[0]} {summary['best_dev_score']}" if summary.get("best_dev_score") is not None else "")
        + ")"
    )


@handle_errors
def train_oppu_command(
    ctx: typer.Context,
    task: str = TaskOption,
    user: Optional[list[str]] = typer.Option(None, "--user", help="A user to train (repeatable)."),
    split: Optional[str] = typer.Option(None, "--split", help="Every user of this split: train, dev, test or all."),
    users: Optional[Path] = typer.Option(None, "--users", help="File with one user id per line."),
    group: Optional[str] = typer.Option(None, "--name", help="Name prefix of the adapters, stored as NAME/USER (default: oppu-TASK)."),
    base: Optional[str] = AutoBaseOption,
    r: int = ROption,
    alpha: float = AlphaOption,
    dropout: float = DropoutOption,
    target_modules: Optional[str] = TargetsOption,
    lr: float = typer.Option(1e-3, "--lr"),
    batch_size: int = typer.Option(4, "--batch-size"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps per user (default: --epochs passes)."),
    epochs: float = typer.Option(2.0, "--epochs", help="Passes over the user's history."),
    max_length: int = MaxLengthOption,
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop each user's training after this many minutes."),
    retrain: bool = typer.Option(False, "--retrain", help="Train again users whose adapter already exists."),
    pairs: str = PairsOption,
    seed: int = SeedOption,
    precision: str = PrecisionOption,
    llm: Optional[str] = LlmOption,
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """Train one LoRA per user on that user's history only (OPPU), on top of the task base.

    Items with an input train in task format, others by language modelling on their text.
    Users whose adapter exists with the same settings are skipped, so a stopped run resumes."""
    from recipes.kit.backbones import load_llm
    from recipes.kit.tasks import get_task
    from recipes.methods.oppu import oppu_group, train_oppu

    store = open_store(ctx)
    task_spec = get_task(task)
    user_ids = named_users(store, task_spec, user, split, users)
    base = resolve_base(store, task_spec, base)
    settings = lora_settings(
        target_modules, r=r, alpha=alpha, dropout=dropout, learning_rate=lr, batch_size=batch_size, steps=steps,
        epochs=epochs, max_length=max_length, seed=seed, precision=precision, max_minutes=max_minutes,
    )  # fmt: skip
    with progress_bar(enabled=not json_out) as tick:
        result = train_oppu(
            store, lambda: load_llm(llm, device), task_spec, user_ids, settings, group or oppu_group(task_spec), base,
            retrain, progress=tick, pairs=pairs,
        )  # fmt: skip
    summary = result.summary()
    if json_out:
        print_json({**summary, "users": len(user_ids)})
        return
    table = Table("group", "base", "users", "trained", "resumed", "kept", "skipped", "mean train s", "mean adapter", title="OPPU")
    table.add_row(
        summary["group"], summary["base"] or "(bare LLM)", str(len(user_ids)), str(summary["trained"]), str(summary["resumed"]),
        str(summary["reused"]),
        str(len(summary["skipped"])), f"{summary['mean_train_seconds']}", human_bytes(summary["mean_adapter_bytes"]),
    )  # fmt: skip
    console.print(table)
    for stale_user, reason in list(summary["stale"].items())[:5]:
        console.print(f"user {stale_user}'s stored adapter was trained again: {reason}")
    for skipped_user, reason in list(summary["skipped"].items())[:5]:
        console.print(f"skipped user {skipped_user}: {reason}")
