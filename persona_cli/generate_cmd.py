"""`persona generate`: one answer for one user with a prompt method."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Optional

import typer

from persona_cli.common import console, err_console, handle_errors, method_settings_given, open_store, print_json, store_encoder
from persona_cli.options import (
    AblationOption, AnswerOption, BaseOption, BeamsOption, DeviceOption, JsonOption, KOption, LengthPenaltyOption, LengthRatioOption, MethodOption,
    NoRepeatOption, PluginOption, PoolOption, MinSimilarityOption, RepetitionOption, RetrieverOption, ReuseOption, SetOption, SpellingsOption, TopKOption,
)  # fmt: skip


@handle_errors
def generate(
    ctx: typer.Context,
    text: str = typer.Argument(..., help="The input, e.g. a LaMP query."),
    user: str = typer.Option(..., "--user", help="The user to answer for."),
    method: str = MethodOption,
    plugin: Optional[str] = PluginOption,
    base: Optional[str] = BaseOption,
    pool: Optional[str] = PoolOption,
    top_k: Optional[int] = TopKOption,
    set_: Optional[list[str]] = SetOption,
    ablation: bool = AblationOption,
    donor: Optional[str] = typer.Option(None, "--donor", help="With --ablation: answer with this other user's history in place of --user's (rag, random, pplug)."),
    task: Optional[str] = typer.Option(None, "--task", help="Task of the input (default: the user's only task)."),
    k: int = KOption,
    retriever: str = RetrieverOption,
    min_similarity: Optional[float] = MinSimilarityOption,
    answer_how: str = AnswerOption,
    seed: int = typer.Option(0, "--seed"),
    llm: Optional[str] = typer.Option(None, "--llm", help="HF model name or path (default: embedded SmolLM2-135M-Instruct)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Default: the task's."),
    max_input_tokens: int = typer.Option(1024, "--max-input-tokens"),
    beams: Optional[int] = BeamsOption,
    no_repeat_ngram: Optional[int] = NoRepeatOption,
    repetition_penalty: Optional[float] = RepetitionOption,
    length_ratio: Optional[float] = LengthRatioOption,
    length_penalty: Optional[float] = LengthPenaltyOption,
    reuse_history: Optional[float] = ReuseOption,
    user_spellings: Optional[int] = SpellingsOption,
    show_prompt: bool = typer.Option(False, "--show-prompt", help="Also print the prompt the LLM saw (on stderr)."),
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """Answer one input for one user: a prompt method picks what of the user's history the LLM sees;
    a model method changes the LLM for this user (`persona methods` lists them all)."""
    from recipes.flows.answer import AnswerSettings, answer, user_task
    from recipes.flows.evaluate import answer_mode
    from recipes.flows.serve import MethodRequest, with_donor
    from recipes.kit.backbones import load_llm

    store = open_store(ctx)
    task_spec = user_task(store, user, task)
    request = MethodRequest(
        method=method, k=k, retriever=retriever, min_similarity=min_similarity, seed=seed, plugin=plugin, base=base, pool=pool,
        top_k=top_k, ablation=ablation, settings=method_settings_given(set_),
    )  # fmt: skip
    if donor is not None:
        request = with_donor(store, request, user, donor)
    request.prompt_settings()
    mode = answer_mode(task_spec, answer_how)
    decoding = task_spec.decoding.override(
        num_beams=beams, no_repeat_ngram_size=no_repeat_ngram, repetition_penalty=repetition_penalty, length_ratio=length_ratio,
        length_penalty=length_penalty,
    )
    decoding.validate()
    started = time.perf_counter()
    how = AnswerSettings(mode, decoding, max_new_tokens, max_input_tokens, reuse_history, user_spellings)
    result = answer(store, user, text, task_spec, request, how, lambda: load_llm(llm, device), store_encoder(store, None, device))
    seconds = round(time.perf_counter() - started, 3)
    if json_out:
        print_json({**result.__dict__, "answer": mode, "decoding": asdict(decoding), "seconds": seconds, **({"donor": donor} if donor else {})})
        return
    if result.reused:
        err_console.print("(the user's own earlier answer, reused: --reuse-history)", highlight=False, markup=False)
    elif show_prompt:
        err_console.print(result.prompt, highlight=False, markup=False)
    if result.respelled:
        err_console.print("(words spelled the way the user's history spells them: --user-spellings)", highlight=False, markup=False)
    console.print(result.output, highlight=False, markup=False)
