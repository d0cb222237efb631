"""`persona pairs build|show`: the training pairs made from users' history items."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from persona_cli.common import console, handle_errors, named_users, open_store, print_json
from persona_cli.options import JsonOption
from recipes import PersonaError

app = typer.Typer(help="Training pairs made from history items (what --pairs rules trains on).", no_args_is_help=True)
RECIPE_HELP = "How pairs are made: rules."
"""--recipe's help: every recipe of history_pairs.PAIR_RECIPES but none, written out (reading them
would import the library before help could show; a test checks the list)."""
RecipeOption = typer.Option("rules", "--recipe", help=RECIPE_HELP)
SeedOption = typer.Option(0, "--seed", help="Seed of the rewriting (the training commands use their own --seed).")


@app.command("build")
@handle_errors
def build(
    ctx: typer.Context,
    task: str = typer.Option(..., "--task", help="Task whose items become pairs, e.g. LaMP-7."),
    user: Optional[list[str]] = typer.Option(None, "--user", help="A user (repeatable)."),
    split: Optional[str] = typer.Option(None, "--split", help="Every user of this split: train, dev, test or all."),
    users: Optional[Path] = typer.Option(None, "--users", help="File with one user id per line."),
    recipe: str = RecipeOption,
    seed: int = SeedOption,
    json_out: bool = JsonOption,
) -> None:
    """Make and store the pairs of these users' history items (training makes them itself when
    missing; this makes them ahead, e.g. to read them first)."""
    from recipes.kit.history_pairs import history_pairs, recipe_id
    from recipes.kit.tasks import get_task

    store = open_store(ctx)
    task_spec = get_task(task)
    _check(recipe)
    user_ids = named_users(store, task_spec, user, split, users)
    store.require_users(user_ids)
    histories = store.histories(user_ids, task_spec.name)
    stored = sum(len(v) for v in store.get_pairs(user_ids, task_spec.name, recipe_id(recipe, seed)).values())
    pairs = history_pairs(store, task_spec, histories, recipe, seed)
    made = sum(len(v) for v in pairs.values())
    summary = {
        "task": task_spec.name, "recipe": recipe_id(recipe, seed), "users": len(user_ids),
        "items": sum(len(v) for v in histories.values()), "pairs": made, "already_stored": stored,
    }  # fmt: skip
    if json_out:
        print_json(summary)
        return
    console.print(
        f"{made} pairs ({summary['recipe']}) from {summary['items']} history items of {len(user_ids)} users; "
        f"{stored} were stored already"
    )


@app.command("show")
@handle_errors
def show(
    ctx: typer.Context,
    user: str = typer.Option(..., "--user", help="The user whose pairs to show."),
    task: Optional[str] = typer.Option(None, "--task", help="Task (default: the user's only task)."),
    recipe: str = RecipeOption,
    seed: int = SeedOption,
    limit: int = typer.Option(10, "--limit", min=0, help="Pairs to print (0: all)."),
    json_out: bool = JsonOption,
) -> None:
    """One user's pairs: the input each history item was given and the output it trains towards
    (made and stored now if they were not yet)."""
    from recipes.kit.history_pairs import history_pairs, recipe_id
    from recipes.kit.tasks import get_task

    store = open_store(ctx)
    _check(recipe)
    store.require_users([user])
    task_spec = get_task(task or _only_task(store, user))
    histories = {user: store.user_history(user, task_spec.name)}
    if not histories[user]:
        raise PersonaError(f"user '{user}' has no {task_spec.name} history")
    pairs = history_pairs(store, task_spec, histories, recipe, seed)[user]
    shown = pairs if limit == 0 else pairs[:limit]
    if json_out:
        print_json({"user": user, "task": task_spec.name, "recipe": recipe_id(recipe, seed), "items": len(histories[user]),
                    "pairs": [{"item_id": p.item_id, "input": p.input, "output": p.output} for p in shown], "total": len(pairs)})
        return
    table = Table("item", "input (made)", "output (the user's)", title=f"user {user}: {len(pairs)} pairs of {len(histories[user])} items ({recipe_id(recipe, seed)})")
    for pair in shown:
        table.add_row(pair.item_id, task_spec.query_text(pair.input), pair.output)
    console.print(table)


def _check(recipe: str) -> None:
    from recipes.kit.history_pairs import check_recipe

    check_recipe(recipe, "--recipe")
    if recipe == "none":
        raise PersonaError("--recipe none makes no pairs; use rules")


def _only_task(store, user: str) -> str:
    tasks = sorted({item.task for item in store.user_history(user)})
    if len(tasks) != 1:
        raise PersonaError(f"user '{user}' has items of {len(tasks)} tasks ({', '.join(tasks) or 'none'}); pass --task")
    return tasks[0]
