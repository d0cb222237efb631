"""`persona plugins list|show|export|import|delete`: the trained plug-ins in the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from persona_cli.common import console, handle_errors, human_bytes, open_store, print_json
from persona_cli.options import DeviceOption, JsonOption

app = typer.Typer(help="Trained plug-ins (task LoRA, OPPU adapters): list, show, export as peft folders, import.", no_args_is_help=True)


def _row(plugin) -> dict:
    return {k: v for k, v in plugin.__dict__.items() if k not in ("weights", "metrics")} | {
        "metrics": {k: v for k, v in plugin.metrics.items() if k != "curve"}
    }


@app.command("list")
@handle_errors
def list_plugins(
    ctx: typer.Context,
    kind: Optional[str] = typer.Option(None, "--kind", help="Only this kind: task-lora, oppu, lora."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Only names starting with this, e.g. oppu-LaMP-7/."),
    json_out: bool = JsonOption,
) -> None:
    """Stored plug-ins in name order, with size and what they were trained on."""
    plugins = open_store(ctx).list_plugins(kind, prefix)
    if json_out:
        print_json({"plugins": [_row(p) for p in plugins]})
        return
    table = Table("name", "kind", "task", "user", "base", "llm", "size", "train s", "created", title=f"{len(plugins)} plug-ins")
    for p in plugins:
        seconds = p.metrics.get("train_seconds")
        created = p.created_at.strftime("%Y-%m-%d %H:%M") if p.created_at else "-"
        table.add_row(
            p.name, p.kind, p.task or "-", p.user_id or "-", p.base or "-", p.llm, human_bytes(p.size),
            f"{seconds:.1f}" if seconds is not None else "-", created,
        )  # fmt: skip
    console.print(table)


@app.command("show")
@handle_errors
def show(ctx: typer.Context, name: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """One plug-in: config, training metrics and its loss curve."""
    plugin = open_store(ctx).get_plugin(name)
    if json_out:
        print_json({**_row(plugin), "curve": plugin.metrics.get("curve", [])})
        return
    table = Table(title=f"plug-in {plugin.name}", show_header=False)
    for key in ("kind", "task", "user_id", "base", "llm", "encoder", "created_at"):
        table.add_row(key, str(getattr(plugin, key) or "-"))
    table.add_row("size", human_bytes(plugin.size))
    for key, value in plugin.metrics.items():
        if key != "curve":
            table.add_row(key, str(value))
    table.add_row("config", json.dumps(plugin.config, sort_keys=True))
    console.print(table)
    curve = plugin.metrics.get("curve") or []
    if curve:
        every = max(1, len(curve) // 10)
        shown = Table("step", "loss", "dev loss", title="training curve")
        for point in curve[::every] + ([curve[-1]] if (len(curve) - 1) % every else []):
            shown.add_row(str(point["step"]), f"{point['loss']:.4f}", f"{point['dev_loss']:.4f}" if "dev_loss" in point else "")
        console.print(shown)


@app.command("export")
@handle_errors
def export(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A stored LoRA plug-in."),
    directory: Path = typer.Argument(..., help="New folder for the peft adapter."),
    json_out: bool = JsonOption,
) -> None:
    """Write a LoRA plug-in as a standard peft adapter folder for the bare LLM (its bases folded in):
    PeftModel.from_pretrained(llm, DIR) loads it and gives the same outputs."""
    from recipes.kit.plugins import export_plugin

    result = export_plugin(open_store(ctx), name, directory)
    if json_out:
        print_json(result)
        return
    folded = f", with base {' + '.join(result['folded_bases'])} folded in" if result["folded_bases"] else ""
    console.print(f"exported {name} to {result['directory']} (rank {result['rank']}, {result['modules']} modules{folded})")


@app.command("import")
@handle_errors
def import_(
    ctx: typer.Context,
    directory: Path = typer.Argument(..., help="A peft LoRA adapter folder."),
    name: str = typer.Option(..., "--name", help="Name to store it under."),
    kind: str = typer.Option("lora", "--kind", help="lora, task-lora or oppu (with --user)."),
    task: Optional[str] = typer.Option(None, "--task", help="Task it is for."),
    user: Optional[str] = typer.Option(None, "--user", help="For --kind oppu: whose adapter it is."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a plug-in of that name."),
    llm: Optional[str] = typer.Option(None, "--llm", help="The LLM it adapts (default: embedded SmolLM2-135M-Instruct)."),
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """Store a peft LoRA folder as a plug-in; peft loads it onto the LLM first, so a mismatch is refused."""
    from recipes.kit.backbones import load_llm
    from recipes.kit.plugins import import_plugin
    from recipes.kit.tasks import get_task

    store = open_store(ctx)
    task_name = get_task(task).name if task else None
    plugin = import_plugin(store, lambda: load_llm(llm, device), directory, name, kind, task_name, user, replace)
    if json_out:
        print_json(_row(plugin))
        return
    console.print(f"imported {directory} as plug-in [bold]{plugin.name}[/] ({plugin.kind}, {human_bytes(plugin.metrics['adapter_bytes'])})")


@app.command("delete")
@handle_errors
def delete(ctx: typer.Context, names: list[str] = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Remove plug-ins by name."""
    removed = open_store(ctx).delete_plugins(names)
    if json_out:
        print_json({"deleted": removed})
        return
    console.print(f"deleted {removed} plug-in(s)")
