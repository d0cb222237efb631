"""`persona train-embedder` (PPlug's user embedder) and `persona explain` (what it attended to)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from persona_cli.common import console, handle_errors, human_bytes, open_store, print_json, progress_bar
from persona_cli.options import DeviceOption, JsonOption, LlmOption, MaxLengthOption, MaxMinutesOption, PairsOption, PrecisionOption, SeedOption, TaskOption


@handle_errors
def train_embedder(
    ctx: typer.Context,
    task: str = TaskOption,
    name: Optional[str] = typer.Option(None, "--name", help="Plug-in name (default: pplug-TASK)."),
    base: Optional[str] = typer.Option(None, "--base", help="Train over this stored plug-in, e.g. task-lora-LaMP-7 (default: the bare LLM, as the paper)."),
    pooling: str = typer.Option("attention", "--pooling", help="attention (weights from the input) or mean (all history items alike)."),
    no_personal: bool = typer.Option(False, "--no-personal", help="Ablation: only the instruction token, no personal token (reads no history)."),
    history_dropout: bool = typer.Option(False, "--history-dropout", help="Also train on a copy of each example with a random part of the history dropped."),
    history_examples: bool = typer.Option(False, "--history-examples", help="Also learn from training users' history items that have an input (each against the rest of the history)."),
    pairs: str = PairsOption,
    history_cap: int = typer.Option(512, "--history-cap", help="Most recent history items a personal embedding reads."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate of the projector and instruction embedding."),
    encoder_lr: float = typer.Option(2e-5, "--encoder-lr", help="Peak learning rate of the input encoder (0 freezes it)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: --epochs passes)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the examples (default auto: 4 over small data, at most 2,400 examples drawn over large data)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Measure the dev-split loss every N steps (default: 8 times in all); the best step is kept."),
    max_minutes: Optional[float] = MaxMinutesOption,
    max_length: int = MaxLengthOption,
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Train on at most N examples."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a stored plug-in of that name."),
    seed: int = SeedOption,
    precision: str = PrecisionOption,
    llm: Optional[str] = LlmOption,
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """Train PPlug's user embedder (input encoder, projector, instruction embedding) on training-split
    users' queries with the LLM frozen; the dev split picks the best step.

    Any user with stored history is then served with no training (generate/evaluate --method pplug).
    An interrupted run resumes from its last checkpoint when started again with the same options."""
    from recipes.kit.backbones import load_llm
    from recipes.kit.tasks import get_task
    from recipes.methods.pplug.training import PPlugSettings, pplug_name, train_pplug

    store = open_store(ctx)
    task_spec = get_task(task)
    settings = PPlugSettings(
        pooling=pooling, personal=not no_personal, history_dropout=history_dropout, history_examples=history_examples,
        pairs=pairs, history_cap=history_cap,
        learning_rate=lr, encoder_learning_rate=encoder_lr, batch_size=batch_size, steps=steps, epochs=epochs,
        eval_every=eval_every, max_length=max_length, precision=precision, seed=seed, max_minutes=max_minutes,
    )  # fmt: skip
    settings.validate()
    base = None if base == "none" else base
    with progress_bar(enabled=not json_out) as tick:
        plugin = train_pplug(
            store, lambda: load_llm(llm, device), task_spec, settings, name or pplug_name(task_spec), base,
            replace=replace, max_examples=max_examples, progress=tick,
        )  # fmt: skip
    summary = {k: v for k, v in plugin.metrics.items() if k != "curve"}
    facts = {key: plugin.config[key] for key in ("train_users", "train_examples", "dev_examples")}
    if json_out:
        print_json({"name": plugin.name, "kind": plugin.kind, "task": plugin.task, "base": plugin.base, "llm": plugin.llm,
                    "encoder": plugin.encoder, **plugin.config["shape"], **facts, **summary})
        return
    resumed = f", resumed at step {summary['resumed_from']}" if summary.get("resumed_from") else ""
    if summary.get("ignored_checkpoint"):
        console.print(f"[yellow]{summary['ignored_checkpoint']}[/]")
    shape = plugin.config["shape"]
    kind = f"{shape['pooling']} pooling" if shape["personal"] else "no personal token"
    console.print(
        f"stored plug-in [bold]{plugin.name}[/] ({kind}, {human_bytes(summary['weights_bytes'])}): "
        f"{facts['train_examples']} examples of {facts['train_users']} training users, {summary['steps']} steps in "
        f"{summary['train_seconds']:.1f} s{resumed}; final loss {summary['final_loss']}; kept step {summary['best_step']} "
        f"(dev loss {summary['best_dev_loss']} on {facts['dev_examples']} dev examples)"
    )


@handle_errors
def explain_command(
    ctx: typer.Context,
    text: str = typer.Argument(..., help="The input, e.g. a LaMP query."),
    user: str = typer.Option(..., "--user", help="Whose history to weigh."),
    task: Optional[str] = typer.Option(None, "--task", help="Task of the input (default: the user's only task)."),
    plugin: Optional[str] = typer.Option(None, "--plugin", help="The PPlug embedder (default: pplug-TASK)."),
    top: int = typer.Option(5, "--top", help="How many history items to show."),
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """The user's history items that weigh most in PPlug's personal embedding for this input, with their weights."""
    from recipes.flows.answer import user_task
    from recipes.kit.backbones import resolve_device
    from recipes.methods.pplug.serving import explain
    from recipes.methods.pplug.training import pplug_name

    store = open_store(ctx)
    task_spec = user_task(store, user, task)
    result = explain(store, task_spec, user, text, plugin or pplug_name(task_spec), top, str(resolve_device(device)))
    if json_out:
        print_json(result)
        return
    table = Table("rank", "weight", "x uniform", "item", "date", "text", title=f"user {user}: what {result['plugin']} attends to")
    for item in result["items"]:
        text_ = item["text"] if len(item["text"]) <= 90 else item["text"][:87] + "..."
        table.add_row(
            str(item["rank"]), f"{item['weight']:.4f}", f"{item['weight'] / result['uniform_weight']:.2f}", item["item_id"],
            (item["timestamp"] or "-")[:10], text_,
        )  # fmt: skip
    console.print(table)
    console.print(
        f"{result['pooling']} pooling over {result['history_items']} items (uniform weight {result['uniform_weight']:.4f}); "
        f"weights as spread as {result['effective_items']} equal items"
    )
