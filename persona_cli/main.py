"""The `persona` Typer app: global options and the command groups."""

from __future__ import annotations

import os
from typing import Optional

import typer

from persona_cli import (
    evaluate_cmd, generate_cmd, ingest_cmd, lora_cmd, methods_cmd, pairs_cmd, pieces_cmd, plugins_cmd, pplug_cmd, runs_cmd, search_cmd, store_cmd,
    users_cmd,
)  # fmt: skip

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    name="persona",
    help="Personalize LLMs for many users from their past behaviour (PPlug, Per-Pcs and baselines).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    store: Optional[str] = typer.Option(
        None, "--store", envvar="PERSONA_STORE", help="Store directory or URI (default: a per-user data directory)."
    ),
    storage_option: Optional[list[str]] = typer.Option(
        None, "--storage-option",
        help="An object-store setting for an s3:// (gs://, az://) store, KEY=VALUE (repeatable), e.g. endpoint=http://127.0.0.1:9000, "
        "region=us-east-1, allow_http=true; credentials too, though AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment "
        "keep them out of your shell history. Never printed.",
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", envvar="PERSONA_THREADS", min=1,
        help="CPU threads for torch (default: one per core). On a shared machine give each job only the cores it has to itself.",
    ),
) -> None:
    """Global options apply to every command."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    state = ctx.ensure_object(dict)
    state["store_path"] = store
    state["storage_options"] = storage_option or []


app.command("ingest")(ingest_cmd.ingest)
app.command("search")(search_cmd.search)
app.command("generate")(generate_cmd.generate)
app.command("evaluate")(evaluate_cmd.evaluate)
app.command("methods")(methods_cmd.methods)
app.command("adapt")(lora_cmd.adapt)
app.command("train-oppu")(lora_cmd.train_oppu_command)
app.command("register-sharers")(pieces_cmd.register_sharers_command)
app.command("assemble")(pieces_cmd.assemble_command)
app.command("train-embedder")(pplug_cmd.train_embedder)
app.command("explain")(pplug_cmd.explain_command)
app.add_typer(store_cmd.app, name="store")
app.add_typer(users_cmd.app, name="users")
app.add_typer(runs_cmd.app, name="runs")
app.add_typer(plugins_cmd.app, name="plugins")
app.add_typer(pieces_cmd.app, name="pool")
app.add_typer(pairs_cmd.app, name="pairs")
