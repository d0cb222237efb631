"""`persona search`: nearest items of one user's history."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from persona_cli.common import console, handle_errors, open_store, print_json
from persona_cli.options import DeviceOption, JsonOption
from recipes import PersonaError


@handle_errors
def search(
    ctx: typer.Context,
    text: str = typer.Argument(..., help="What to look for."),
    user: str = typer.Option(..., "--user", help="Whose history to search."),
    k: int = typer.Option(5, "--k", min=1, help="How many items."),
    task: Optional[str] = typer.Option(None, "--task", help="Only items of this task."),
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """Cosine search over the stored vectors, with the encoder the store was built with."""
    from recipes.kit.backbones import load_encoder
    from recipes.kit.retrieval import dense_search

    store = open_store(ctx)
    known = store.encoder()
    if known is None:
        raise PersonaError(f"store {store.uri} has no history vectors yet; run persona ingest first")
    hits = dense_search(store, load_encoder(known[0], device), user, text, k=k, task=task)
    if json_out:
        print_json([{"item_id": h.item.item_id, "score": round(h.score, 4), "text": h.item.text} for h in hits])
        return
    table = Table("score", "item", "text", title=f"user {user}: nearest to “{text}”")
    for h in hits:
        table.add_row(f"{h.score:.3f}", h.item.item_id, h.item.text)
    console.print(table)
