"""`persona users list|show`."""

from __future__ import annotations

import typer
from rich.table import Table

from persona_cli.common import console, handle_errors, open_store, print_json
from persona_cli.options import JsonOption
from recipes import PersonaError

app = typer.Typer(help="Browse the users in the store.", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_users(
    ctx: typer.Context,
    limit: int = typer.Option(50, "--limit", min=1),
    offset: int = typer.Option(0, "--offset", min=0),
    json_out: bool = JsonOption,
) -> None:
    """Users with their numbers of history items and queries."""
    store = open_store(ctx)
    users = store.list_users(limit=limit, offset=offset)
    total = store.count("users")
    if json_out:
        print_json({"total": total, "users": [u.__dict__ for u in users]})
        return
    table = Table("user", "items", "queries", "first", "last", title=f"users {offset + 1}-{offset + len(users)} of {total}")
    for u in users:
        table.add_row(u.user_id, str(u.n_items), str(u.n_queries), _date(u.first_ts), _date(u.last_ts))
    console.print(table)


@app.command("show")
@handle_errors
def show(
    ctx: typer.Context,
    user_id: str = typer.Argument(...),
    items: int = typer.Option(10, "--items", min=0, help="History items to print (0: all)."),
    json_out: bool = JsonOption,
) -> None:
    """One user's counts, history and queries."""
    store = open_store(ctx)
    user = store.get_user(user_id)
    if user is None:
        raise PersonaError(f"no user '{user_id}' in store {store.uri}")
    history = store.user_history(user_id)
    queries = store.user_queries(user_id)
    if json_out:
        print_json(
            {
                "user": user.__dict__,
                "history": [{k: v for k, v in b.__dict__.items() if k != "vector"} for b in history],
                "queries": [q.__dict__ for q in queries],
            }
        )
        return
    console.print(f"[bold]user {user.user_id}[/]: {user.n_items} items, {user.n_queries} queries"
                  + (f", metadata {user.metadata}" if user.metadata else ""))
    shown = history if items == 0 else history[-items:]
    table = Table("item", "task", "time", "text", title=f"history (latest {len(shown)} of {len(history)})")
    for b in shown:
        table.add_row(b.item_id, b.task, _date(b.timestamp), b.text)
    console.print(table)
    if queries:
        qtable = Table("query", "task", "split", "input", "gold output", title="queries")
        for q in queries:
            qtable.add_row(q.query_id, q.task, q.split or "-", q.input, q.output or "-")
        console.print(qtable)


def _date(value) -> str:
    return value.isoformat(sep=" ", timespec="minutes") if value else "-"
