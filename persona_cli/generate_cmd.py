"""`persona generate`: one answer for one user with a prompt method."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Optional

import typer

from persona_cli.common import (
    MethodOption, PoolOption, TopKOption, BeamsOption, NoRepeatOption, RepetitionOption, LengthRatioOption,
    DeviceOption, JsonOption, console, err_console, handle_errors, open_store, print_json, store_encoder,
)  # fmt: skip
from recipes.flows.answer import answer, prompt_method, user_task
from recipes.kit.backbones import load_llm
from recipes.flows.evaluate import answer_mode
from recipes.kit.prompts import PromptSettings


@handle_errors
def generate(
    ctx: typer.Context,
    text: str = typer.Argument(..., help="The input, e.g. a LaMP query."),
    user: str = typer.Option(..., "--user", help="The user to answer for."),
    method: str = MethodOption,
    plugin: Optional[str] = typer.Option(None, "--plugin", help="task-lora, pplug: plug-in name; oppu: adapter group (defaults: task-lora-TASK, pplug-TASK, oppu-TASK)."),
    base: Optional[str] = typer.Option(None, "--base", help="Run a prompt method on this stored plug-in, e.g. task-lora-LaMP-7."),
    pool: Optional[str] = PoolOption,
    top_k: Optional[int] = TopKOption,
    task: Optional[str] = typer.Option(None, "--task", help="Task of the input (default: the user's only task)."),
    k: int = typer.Option(1, "--k", help="History items in the prompt (random, rag)."),
    retriever: str = typer.Option("bm25", "--retriever", help="rag: bm25, recency or dense."),
    answer_how: str = typer.Option("auto", "--answer", help="auto (rank for label tasks), rank or generate."),
    seed: int = typer.Option(0, "--seed"),
    llm: Optional[str] = typer.Option(None, "--llm", help="HF model name or path (default: embedded SmolLM2-135M-Instruct)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Default: the task's."),
    max_input_tokens: int = typer.Option(1024, "--max-input-tokens"),
    beams: Optional[int] = BeamsOption,
    no_repeat_ngram: Optional[int] = NoRepeatOption,
    repetition_penalty: Optional[float] = RepetitionOption,
    length_ratio: Optional[float] = LengthRatioOption,
    show_prompt: bool = typer.Option(False, "--show-prompt", help="Also print the prompt the LLM saw (on stderr)."),
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """Answer one input for one user: a prompt method picks what of the user's history the LLM sees;
    task-lora answers with the task-adapted LLM, oppu and perpcs with the user's own adapter."""
    store = open_store(ctx)
    task_spec = user_task(store, user, task)
    settings = PromptSettings(method=prompt_method(method), k=k, retriever=retriever, seed=seed)
    mode = answer_mode(task_spec, answer_how)
    decoding = task_spec.decoding.override(
        num_beams=beams, no_repeat_ngram_size=no_repeat_ngram, repetition_penalty=repetition_penalty, length_ratio=length_ratio
    )
    decoding.validate()
    started = time.perf_counter()
    result = answer(
        store, user, text, task_spec, settings, mode, lambda: load_llm(llm, device), store_encoder(store, None, device),
        max_new_tokens, max_input_tokens, method, plugin, base, pool, top_k, decoding,
    )  # fmt: skip
    seconds = round(time.perf_counter() - started, 3)
    if json_out:
        print_json({**result.__dict__, "answer": mode, "decoding": asdict(decoding), "seconds": seconds})
        return
    if show_prompt:
        err_console.print(result.prompt, highlight=False, markup=False)
    console.print(result.output, highlight=False, markup=False)
