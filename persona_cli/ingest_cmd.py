"""`persona ingest`: users.jsonl or LaMP JSON into the store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from persona_cli.common import console, engine_of, handle_errors, open_store, print_json, progress_bar
from persona_cli.options import DeviceOption, EngineOption, JsonOption, RayAddressOption, WorkersOption
from recipes import PersonaError


@handle_errors
def ingest(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="users.jsonl, or a LaMP questions.json with --format lamp."),
    format: str = typer.Option("auto", "--format", help="jsonl, lamp, or auto (by file extension)."),
    outputs: Optional[Path] = typer.Option(None, "--outputs", help="LaMP outputs.json with the gold outputs."),
    task: str = typer.Option("custom", "--task", help="Task name, e.g. LaMP-7 (LaMP tasks decide which item fields are embedded)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split recorded on the queries: train, dev or test."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Sentence-transformers name or path (default: embedded all-MiniLM-L6-v2)."),
    device: str = DeviceOption,
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Encoder batch size."),
    engine: str = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: int = WorkersOption,
    json_out: bool = JsonOption,
) -> None:
    """Validate the whole input, embed every history item, and upsert users, items and queries."""
    from recipes.flows.ingest import ingest as run_ingest, lamp_source, users_jsonl_source
    from recipes.kit.backbones import load_encoder
    from recipes.kit.tasks import get_task

    kind = _format_of(path, format)
    task_spec = get_task(task)
    if kind == "lamp" and task_spec.name == "custom":
        raise PersonaError("--format lamp needs --task, e.g. --task LaMP-7")
    if kind == "jsonl" and outputs is not None:
        raise PersonaError("--outputs goes with --format lamp; users.jsonl carries outputs in its queries")
    if split is not None and split not in ("train", "dev", "test"):
        raise PersonaError(f"--split must be train, dev or test, got '{split}'")
    running_on = engine_of(engine, ray_address, workers)
    store = open_store(ctx)
    source = (
        lamp_source(path, task_spec, outputs, split) if kind == "lamp" else users_jsonl_source(path, task_spec, split)
    )
    with progress_bar(enabled=not json_out) as tick:
        summary = run_ingest(
            store, source, lambda: load_encoder(encoder, device), batch_size=batch_size, progress=tick, engine=running_on
        )
    summary = {"store": store.uri, "task": task_spec.name, **summary}
    if json_out:
        print_json(summary)
        return
    table = Table(title=f"ingested {path.name}", show_header=False)
    for key in ("store", "task", "encoder", "users", "items", "queries", "seconds", "items_per_s"):
        table.add_row(key, str(summary[key]))
    console.print(table)


def _format_of(path: Path, format: str) -> str:
    if format in ("jsonl", "lamp"):
        return format
    if format != "auto":
        raise PersonaError(f"--format must be jsonl, lamp or auto, got '{format}'")
    return "jsonl" if path.suffix == ".jsonl" else "lamp"
