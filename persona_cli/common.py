"""What every command shares: the store option, one-line errors, JSON output and progress bars.

The command modules import the library (torch, transformers, LanceDB: seconds) inside their
commands, not at the top, so that help, a wrong option and the store-browsing commands start at once."""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from recipes import PersonaError

if TYPE_CHECKING:
    from recipes.kit.engine import Engine
    from recipes.kit.tasks import Task
    from recipes.kit.training_loop import LoraSettings
    from store import Store

console = Console()
err_console = Console(stderr=True)

def open_store(ctx: typer.Context) -> Store:
    """The store named by --store / PERSONA_STORE (opened once per command)."""
    from store import Store

    state = ctx.ensure_object(dict)
    if "store" not in state:
        state["store"] = Store(state.get("store_path"), key_values(state.get("storage_options"), "--storage-option", secret=True))
    return state["store"]


def store_encoder(store: Store, name: Optional[str], device: str) -> Callable[[], Any]:
    """A loader of the encoder named, else of the one the store's vectors were made with (it holds
    the name, not the store, so a Ray engine can ship it to its workers)."""
    from recipes.kit.backbones import load_encoder

    chosen = name or (store.encoder() or (None,))[0]
    return lambda: load_encoder(chosen, device)


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
    from recipes.kit.inputs import read_user_ids
    from recipes.kit.splits import split_users

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


def lora_settings(target_modules: Optional[str], **values) -> LoraSettings:
    """LoraSettings from the command's options, checked before any model loads."""
    from recipes.kit.training_loop import LoraSettings

    names = None
    if target_modules is not None:
        names = [n.strip() for n in target_modules.split(",") if n.strip()]
        if not names:
            raise PersonaError("--target-modules is empty")
    settings = LoraSettings(target_modules=names, **values)
    settings.validate()
    return settings


def resolve_base(store: Store, task: Task, base: Optional[str]) -> Optional[str]:
    """--base auto: the task LoRA when it is stored; none: the bare LLM; else the plug-in named."""
    from recipes.methods.task_lora import task_lora_name

    if base == "auto":
        default = task_lora_name(task)
        return default if store.get_plugins([default]) else None
    return None if base == "none" else base


def key_values(values: Optional[list[str]], flag: str, secret: bool = False) -> dict[str, str]:
    """Repeated NAME=VALUE options as a dict. With `secret` an error never echoes what was given."""
    settings: dict[str, str] = {}
    for value in values or []:
        name, eq, text = value.partition("=")
        if not eq or not name.strip():
            shown = "(not shown: it may hold a credential)" if secret else value
            raise PersonaError(f"{flag} {shown}: expected NAME=VALUE")
        settings[name.strip()] = text.strip()
    return settings


def method_settings_given(values: Optional[list[str]]) -> dict[str, str]:
    """--set NAME=VALUE options as a dict (checked against the method by the library)."""
    return key_values(values, "--set")


def engine_of(name: str, address: Optional[str], workers: int) -> Engine:
    """The Engine the --engine, --ray-address and --workers options name, checked."""
    from recipes.kit.engine import Engine

    engine = Engine(name, address if name == "ray" else None, workers)
    engine.validate()
    return engine
