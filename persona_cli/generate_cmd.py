"""`persona generate`: one answer for one user (non-personalized until later methods plug in)."""

from __future__ import annotations

import time
from typing import Optional

import typer

from persona_cli.common import DeviceOption, JsonOption, console, handle_errors, open_store, print_json
from recipes import PersonaError
from recipes.backbones import load_llm
from recipes.generation import generate as run_generate


@handle_errors
def generate(
    ctx: typer.Context,
    text: str = typer.Argument(..., help="The input, e.g. a LaMP query."),
    user: str = typer.Option(..., "--user", help="The user to answer for."),
    method: str = typer.Option("none", "--method", help="Personalization method: none (more come with later releases)."),
    llm: Optional[str] = typer.Option(None, "--llm", help="HF model name or path (default: embedded SmolLM2-135M-Instruct)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """Greedy generation with the frozen LLM."""
    if method != "none":
        raise PersonaError(f"--method {method} is not available; available: none")
    store = open_store(ctx)
    if store.get_user(user) is None:
        raise PersonaError(f"no user '{user}' in store {store.uri}")
    model = load_llm(llm, device)
    started = time.perf_counter()
    output = run_generate(model, [text], max_new_tokens=max_new_tokens, batch_size=1)[0]
    seconds = round(time.perf_counter() - started, 3)
    if json_out:
        print_json({"user": user, "method": method, "llm": model.id, "input": text, "output": output, "seconds": seconds})
        return
    console.print(output, highlight=False, markup=False)
