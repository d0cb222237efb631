"""`persona runs list|show|compare`: the stored evaluation runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from persona_cli.common import console, handle_errors, open_store, print_json
from persona_cli.options import JsonOption

app = typer.Typer(help="Stored evaluation runs: list, show, compare.", no_args_is_help=True)


def metrics_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())


@app.command("list")
@handle_errors
def list_runs(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, "--task", help="Only runs of this task."),
    json_out: bool = JsonOption,
) -> None:
    """Every stored run, oldest first."""
    from recipes.kit.tasks import get_task

    runs = open_store(ctx).list_runs(get_task(task).name if task else None)
    if json_out:
        print_json({"runs": [r.__dict__ for r in runs]})
        return
    table = Table("run", "task", "method", "split", "examples", "metrics", "examples/s", "created", title=f"{len(runs)} runs")
    for r in runs:
        created = r.created_at.strftime("%Y-%m-%d %H:%M") if r.created_at else "-"
        table.add_row(r.run_id, r.task, r.method, r.split or "-", str(r.n_examples), metrics_text(r.metrics), f"{r.examples_per_s:.2f}", created)
    console.print(table)


@app.command("show")
@handle_errors
def show(
    ctx: typer.Context,
    run_id: str = typer.Argument(...),
    examples: int = typer.Option(5, "--examples", min=0, help="Predictions to print."),
    export: Optional[Path] = typer.Option(None, "--export", help="Write all predictions as a LaMP predictions JSON file."),
    json_out: bool = JsonOption,
) -> None:
    """A run's config, metrics, timing and some of its predictions."""
    from recipes.flows.evaluate import write_lamp_predictions
    from recipes.kit.tasks import get_task

    store = open_store(ctx)
    run = store.get_run(run_id)
    predictions = store.run_predictions(run_id)
    if export is not None:
        write_lamp_predictions(export, get_task(run.task), predictions)
    if json_out:
        print_json({**run.__dict__, "predictions": [p.__dict__ for p in predictions[:examples]]})
        return
    table = Table(title=f"run {run.run_id}", show_header=False)
    for key in ("task", "method", "split", "llm", "n_examples", "wall_s", "examples_per_s", "created_at"):
        table.add_row(key, str(getattr(run, key)))
    for key, value in run.metrics.items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("config", json.dumps(run.config, sort_keys=True))
    console.print(table)
    if examples:
        shown = Table("query", "user", "output", "gold", title=f"first {min(examples, len(predictions))} of {len(predictions)} predictions")
        for p in predictions[:examples]:
            shown.add_row(p.query_id, p.user_id, p.output, p.gold or "-")
        console.print(shown)
    if export is not None:
        console.print(f"predictions written to {export}")


@app.command("compare")
@handle_errors
def compare(
    ctx: typer.Context,
    run_ids: list[str] = typer.Argument(..., help="Two or more run ids."),
    json_out: bool = JsonOption,
) -> None:
    """Runs side by side, every metric recomputed on only the queries all of them answered."""
    from recipes.flows.evaluate import compare_runs
    from recipes.kit.tasks import get_task

    result = compare_runs(open_store(ctx), run_ids)
    if json_out:
        print_json(result)
        return
    names = result["metric_names"]
    table = Table("run", "method", "split", *names, "examples/s", title=f"{result['task']}: {result['shared_queries']} shared queries")
    task = get_task(result["task"])
    best = {
        name: (max if task.higher_is_better(name) else min)(r["metrics"][name] for r in result["runs"]) for name in names
    }
    for r in result["runs"]:
        cells = [
            f"[bold]{r['metrics'][n]:.4f}[/]" if r["metrics"][n] == best[n] else f"{r['metrics'][n]:.4f}" for n in names
        ]
        table.add_row(r["run_id"], r["method"], r["split"] or "-", *cells, f"{r['examples_per_s']:.2f}")
    console.print(table)
