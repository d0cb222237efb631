"""`persona evaluate`: run a method on a task's queries and score it, or score a LaMP predictions file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from persona_cli.common import console, engine_of, handle_errors, method_settings_given, open_store, print_json, progress_bar, store_encoder
from persona_cli.options import (
    AblationOption, AnswerOption, BaseOption, BeamsOption, DeviceOption, EngineOption, JsonOption, KOption, LengthPenaltyOption, LengthRatioOption, MethodOption,
    NoRepeatOption, PluginOption, PoolOption, RayAddressOption, MinSimilarityOption, RepetitionOption, RetrieverOption, ReuseOption, SetOption, SpellingsOption, TopKOption,
    WorkersOption,
)  # fmt: skip
from persona_cli.runs_cmd import metrics_text
from recipes import PersonaError


@handle_errors
def evaluate(
    ctx: typer.Context,
    task: str = typer.Option(..., "--task", help="Task of the queries, e.g. LaMP-7 or LaMP-2N."),
    method: str = MethodOption,
    plugin: Optional[str] = PluginOption,
    base: Optional[str] = BaseOption,
    pool: Optional[str] = PoolOption,
    top_k: Optional[int] = TopKOption,
    set_: Optional[list[str]] = SetOption,
    k: int = KOption,
    retriever: str = RetrieverOption,
    min_similarity: Optional[float] = MinSimilarityOption,
    answer: str = AnswerOption,
    split: str = typer.Option("test", "--split", help="train, dev, test or all (fixed user-level split)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N queries."),
    users: Optional[Path] = typer.Option(None, "--users", help="File with one user id per line."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generation batch."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Default: the task's."),
    max_input_tokens: int = typer.Option(1024, "--max-input-tokens", help="Prompt token budget."),
    beams: Optional[int] = BeamsOption,
    no_repeat_ngram: Optional[int] = NoRepeatOption,
    repetition_penalty: Optional[float] = RepetitionOption,
    length_ratio: Optional[float] = LengthRatioOption,
    length_penalty: Optional[float] = LengthPenaltyOption,
    reuse_history: Optional[float] = ReuseOption,
    user_spellings: Optional[int] = SpellingsOption,
    ablation: bool = AblationOption,
    seed: int = typer.Option(0, "--seed", help="Seed of random history choices and of an --ablation that draws users."),
    scoring: str = typer.Option("cleaned", "--scoring", help="cleaned: first paragraph, no announcement or wrapping quotes, labels matched (exact scores reported beside as METRIC-exact); exact: the answer as generated, as LaMP scores it."),
    llm: Optional[str] = typer.Option(None, "--llm", help="HF model name or path (default: embedded SmolLM2-135M-Instruct)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder for --retriever dense (default: the store's)."),
    device: str = DeviceOption,
    engine: str = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: int = WorkersOption,
    export: Optional[Path] = typer.Option(None, "--export", help="Also write the predictions as a LaMP predictions JSON file."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Score this LaMP predictions file instead of running a method."),
    outputs: Optional[Path] = typer.Option(None, "--outputs", help="LaMP outputs.json with the golds (with --predictions)."),
    json_out: bool = JsonOption,
) -> None:
    """Score a method on the task's queries with LaMP's metrics (and, for generation, a cased ROUGE-1 beside them); the run and its predictions are stored."""
    from recipes.flows.evaluate import EvalRequest, evaluate as run_evaluation, write_lamp_predictions
    from recipes.kit.backbones import load_llm
    from recipes.kit.inputs import read_user_ids
    from recipes.kit.tasks import get_task

    if predictions is not None or outputs is not None:
        _score_file(task, predictions, outputs, json_out)
        return
    running_on = engine_of(engine, ray_address, workers)
    store = open_store(ctx)
    request = EvalRequest(
        task=task, method=method, k=k, retriever=retriever, min_similarity=min_similarity, answer=answer, split=split, limit=limit,
        users=read_user_ids(users) if users else None, batch_size=batch_size, max_new_tokens=max_new_tokens,
        max_input_tokens=max_input_tokens, seed=seed, plugin=plugin, base=base, pool=pool, top_k=top_k,
        num_beams=beams, no_repeat_ngram_size=no_repeat_ngram, repetition_penalty=repetition_penalty, length_ratio=length_ratio,
        length_penalty=length_penalty, ablation=ablation, scoring=scoring, settings=method_settings_given(set_), reuse_min_overlap=reuse_history,
        spelling_min_count=user_spellings,
    )  # fmt: skip
    if export is not None and export.is_dir():
        raise PersonaError(f"--export {export}: is a directory; give a file name")

    with progress_bar(enabled=not json_out) as tick:
        run, preds = run_evaluation(
            store, request, lambda: load_llm(llm, device), store_encoder(store, encoder, device), progress=tick, engine=running_on
        )
    if export is not None:
        write_lamp_predictions(export, get_task(run.task), preds)
    if json_out:
        print_json({**run.__dict__, "exported": str(export) if export else None})
        return
    table = Table(title=f"run {run.run_id}: {run.task} {run.method} ({run.split})")
    for column in ("run", "method", "answer", "examples", *run.metrics, "wall s", "examples/s"):
        table.add_column(column, justify="right" if column not in ("method", "answer") else "left")
    table.add_row(
        run.run_id, run.method, run.config["answer"], str(run.n_examples),
        *(f"{v:.4f}" for v in run.metrics.values()), f"{run.wall_s:.1f}", f"{run.examples_per_s:.2f}",
    )  # fmt: skip
    console.print(table)
    if export is not None:
        console.print(f"predictions written to {export}")


def _score_file(task: str, predictions: Optional[Path], outputs: Optional[Path], json_out: bool) -> None:
    from recipes.flows.evaluate import score_files

    if predictions is None or outputs is None:
        raise PersonaError("scoring a file needs both --predictions and --outputs")
    result = score_files(task, predictions, outputs)
    if json_out:
        print_json({"predictions": str(predictions), "outputs": str(outputs), **result})
        return
    console.print(f"{result['task']}: {result['n_examples']} predictions in {predictions}: {metrics_text(result['metrics'])}")
