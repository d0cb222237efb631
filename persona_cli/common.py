"""What every command shares: the store option, one-line errors, JSON output and progress bars."""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from recipes import PersonaError
from recipes.methods.task_lora import split_users
from recipes.kit.inputs import read_user_ids
from recipes.kit.tasks import Task
from store import Store

console = Console()
err_console = Console(stderr=True)

PairsOption = typer.Option(
    "none", "--pairs",
    help="How history items train: none (items without an input by language modelling) or rules (every item made a "
    "task-format pair: its own input, its fields, or for tweets a seeded plain rewrite; see `persona pairs show`).",
)  # fmt: skip
JsonOption = typer.Option(False, "--json", help="Print a JSON object for scripts instead of tables.")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu or cuda[:N].")
MethodOption = typer.Option(
    "none", "--method",
    help="none (k=0), random, rag, pag, task-lora, oppu, perpcs, peft-retrieval, pplug, or a per-user method with a prompt method, e.g. pplug+rag.",
)  # fmt: skip
PoolOption = typer.Option(None, "--pool", help="perpcs, peft-retrieval: pool tag or version (default: the newest).")
TopKOption = typer.Option(None, "--top-k", help="peft-retrieval: sharers mixed (default 3); perpcs: must match the stored assemblies.")
BeamsOption = typer.Option(None, "--beams", help="Beam search with N beams (default: the task's; 1 is greedy).")
NoRepeatOption = typer.Option(None, "--no-repeat-ngram", help="Never repeat an n-gram of the answer itself (0: off; the prompt is not counted).")
RepetitionOption = typer.Option(None, "--repetition-penalty", help="Penalize tokens the answer already used (1.0: off; the prompt is not counted).")
LengthRatioOption = typer.Option(None, "--length-ratio", help="At most RATIO x the input's tokens + 8 new tokens (default: the task's max only).")


def open_store(ctx: typer.Context) -> Store:
    """The store named by --store / PERSONA_STORE (opened once per command)."""
    state = ctx.ensure_object(dict)
    if "store" not in state:
        state["store"] = Store(state.get("store_path"))
    return state["store"]


def store_encoder(store: Store, name: Optional[str], device: str) -> Callable[[], Any]:
    """A loader of the encoder named, else of the one the store's vectors were made with."""
    from recipes.kit.backbones import load_encoder

    def load() -> Any:
        return load_encoder(name or (store.encoder() or (None,))[0], device)

    return load


def handle_errors(fn: Callable) -> Callable:
    """Turn the user's mistakes (PersonaError) into one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PersonaError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def print_json(data: Any) -> None:
    """Machine-readable output on stdout, nothing else printed there."""
    typer.echo(json.dumps(data, ensure_ascii=False, default=str, indent=2))


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A recipes Progress callback drawn as a rich bar on stderr (silent when disabled)."""
    if not enabled:
        yield lambda stage, done, total, note="": None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    ]
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int, note: str = "") -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total or None, note=note)
            bar.update(tasks[stage], completed=done, total=total or None, note=note)

        yield update


def check_one_user_choice(user: Optional[list[str]], split: Optional[str], users: Optional[Path]) -> None:
    """--user, --split and --users name the users a command works on: exactly one of them."""
    if sum([bool(user), split is not None, users is not None]) != 1:
        raise PersonaError("name the users with exactly one of --user, --split or --users")


def named_users(store: Store, task: Task, user: Optional[list[str]], split: Optional[str], users: Optional[Path]) -> list[str]:
    """The users named by exactly one of --user (repeatable), --split (the task's users of that split)
    or --users (a file of ids)."""
    check_one_user_choice(user, split, users)
    if user:
        return list(dict.fromkeys(user))
    return read_user_ids(users) if users else split_users(store, task, split)


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
