"""Per-Pcs: `persona register-sharers`, `persona assemble` and the `persona pool` group."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from persona_cli.common import (
    check_one_user_choice, engine_of, console, handle_errors, human_bytes, lora_settings, open_store, print_json, progress_bar, resolve_base,
)  # fmt: skip
from persona_cli.options import (
    AlphaOption, AutoBaseOption, DeviceOption, DropoutOption, EngineOption, JsonOption, LlmOption, MaxLengthOption, PairsOption, PrecisionOption,
    RayAddressOption, ROption, SeedOption, TargetsOption, WorkersOption,
)  # fmt: skip
from recipes import PersonaError

if TYPE_CHECKING:
    from recipes.methods.perpcs.pool import Choices

PoolOption = typer.Option(None, "--pool", help="Pool tag or version (default: the newest).")


@handle_errors
def register_sharers_command(
    ctx: typer.Context,
    task: str = typer.Option(..., "--task", help="Task whose users share, e.g. LaMP-7."),
    strategy: str = typer.Option("history-cluster", "--strategy", help="history-cluster, most-active or random."),
    k: int = typer.Option(50, "--k", help="How many sharers (k-means clusters for history-cluster)."),
    min_history: int = typer.Option(10, "--min-history", help="A sharer has at least this many history items."),
    candidates: str = typer.Option("train,dev", "--candidates", help="Splits sharers come from (never test)."),
    sharer: Optional[list[str]] = typer.Option(None, "--sharer", help="Register exactly these users instead (repeatable)."),
    base: Optional[str] = AutoBaseOption,
    r: int = ROption,
    alpha: float = AlphaOption,
    dropout: float = DropoutOption,
    target_modules: Optional[str] = TargetsOption,
    lr: float = typer.Option(1e-3, "--lr", help="Sharer LoRA learning rate."),
    batch_size: int = typer.Option(4, "--batch-size"),
    steps: Optional[int] = typer.Option(None, "--steps", help="LoRA steps per sharer (default: --epochs passes; the paper: 100)."),
    epochs: float = typer.Option(2.0, "--epochs", help="Passes over the sharer's history."),
    gate_kind: str = typer.Option(
        "trained", "--gates",
        help="How each piece's gate is made: trained (the paper: --gate-steps with the LoRA frozen) or mean (no training: the "
        "mean direction of the module's inputs over the sharer's history; assembly picks the sharers whose writing the "
        "target's most resembles). One pool holds one kind.",
    ),  # fmt: skip
    gate_steps: int = typer.Option(50, "--gate-steps", help="Gate training steps per sharer (LoRA frozen; --gates trained)."),
    gate_lr: float = typer.Option(2e-2, "--gate-lr", help="Gate learning rate."),
    share_ratio: float = typer.Option(1.0, "--share-ratio", help="Share of each sharer's modules put in the pool."),
    tag: Optional[list[str]] = typer.Option(None, "--tag", help="Extra tag of the new pool version (repeatable)."),
    engine: str = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: int = WorkersOption,
    max_length: int = MaxLengthOption,
    pairs: str = PairsOption,
    seed: int = SeedOption,
    precision: str = PrecisionOption,
    llm: Optional[str] = LlmOption,
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """Choose sharers, train each one's LoRA and gates, and write all pieces as a new pool version.

    Finished sharers are kept until the pool version is written: rerun the same command to resume."""
    from recipes.kit.backbones import load_llm
    from recipes.kit.tasks import get_task
    from recipes.methods.perpcs.gates import GateSettings
    from recipes.methods.perpcs.sharers import candidate_histories, register_sharers, select_sharers

    running_on = engine_of(engine, ray_address, workers)
    store = open_store(ctx)
    task_spec = get_task(task)
    if sharer:
        chosen = list(dict.fromkeys(sharer))
        selection = {"strategy": "given"}
    else:
        histories = candidate_histories(store, task_spec, [s.strip() for s in candidates.split(",") if s.strip()])
        chosen = select_sharers(histories, strategy, k, min_history, seed)
        selection = {"strategy": strategy, "k": k, "min_history": min_history, "candidates": len(histories)}
    settings = lora_settings(
        target_modules, r=r, alpha=alpha, dropout=dropout, learning_rate=lr, batch_size=batch_size, steps=steps,
        epochs=epochs, max_length=max_length, seed=seed, precision=precision,
    )  # fmt: skip
    gates = GateSettings(gate_steps, gate_lr, batch_size, max_length, precision, seed, gate_kind)
    gates.validate()
    base_name = resolve_base(store, task_spec, base)
    with progress_bar(enabled=not json_out) as tick:
        result = register_sharers(
            store, lambda: load_llm(llm, device), task_spec, chosen, settings, gates, base_name, share_ratio, tag, selection, tick, pairs,
            running_on,
        )  # fmt: skip
    summary = {
        "task": result.task, "pool_version": result.pool_version, "tags": result.tags, "base": base_name,
        "sharers": result.sharers, "resumed": result.resumed, "pieces": result.pieces, "bytes": result.bytes,
        "mean_lora_seconds": round(sum(result.lora_seconds) / len(result.lora_seconds), 3),
        "mean_gate_seconds": round(sum(result.gate_seconds) / len(result.gate_seconds), 3), "selection": selection,
    }  # fmt: skip
    if json_out:
        print_json(summary)
        return
    console.print(f"{len(chosen)} sharers ({selection['strategy']}): {', '.join(chosen[:20])}{' …' if len(chosen) > 20 else ''}")
    console.print(
        f"pool version {result.pool_version} [bold]{', '.join(result.tags)}[/]: {len(result.sharers)} sharers, "
        f"{result.pieces} pieces, {human_bytes(result.bytes)}; per sharer {summary['mean_lora_seconds']} s LoRA + "
        f"{summary['mean_gate_seconds']} s gates" + (f" ({len(result.resumed)} resumed)" if result.resumed else "")
    )


@handle_errors
def assemble_command(
    ctx: typer.Context,
    user: Optional[list[str]] = typer.Option(None, "--user", help="A target user (repeatable)."),
    split: Optional[str] = typer.Option(None, "--split", help="Every user of this split: train, dev, test or all (needs --task)."),
    users: Optional[Path] = typer.Option(None, "--users", help="File with one user id per line."),
    task: Optional[str] = typer.Option(None, "--task", help="Task (default: the user's only task)."),
    top_k: int = typer.Option(3, "--top-k", help="Pieces mixed per module."),
    pool: Optional[str] = PoolOption,
    batch_size: int = typer.Option(16, "--batch-size", help="History items per forward pass."),
    max_length: int = MaxLengthOption,
    max_items: Optional[int] = typer.Option(None, "--max-items", help="Assemble from the user's N most recent items only (default: all)."),
    history_format: str = typer.Option(
        "task", "--history-format", help="task: read each item as the sharers trained on it (the pool's pairs); text: as plain text (faster, but the gates choose other pieces)."
    ),
    explain: bool = typer.Option(False, "--explain", help="Show, per layer, the chosen sharers and weights."),
    engine: str = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: int = WorkersOption,
    precision: str = PrecisionOption,
    llm: Optional[str] = LlmOption,
    device: str = DeviceOption,
    json_out: bool = JsonOption,
) -> None:
    """Assemble target users' adapters from the pool, layer by layer over their history, without training.

    Stores per module only (sharer, weight) against the pool version used."""
    from recipes.flows.answer import user_task
    from recipes.kit.backbones import load_llm
    from recipes.kit.inputs import read_user_ids
    from recipes.kit.splits import split_users
    from recipes.kit.tasks import get_task
    from recipes.methods.perpcs.assembly import assemble_users
    from recipes.methods.perpcs.pool import sharer_mass

    running_on = engine_of(engine, ray_address, workers)
    store = open_store(ctx)
    check_one_user_choice(user, split, users)
    if user:
        user_ids = list(dict.fromkeys(user))
        task_spec = user_task(store, user_ids[0], task)
    else:
        if task is None:
            raise PersonaError("--split and --users need --task")
        task_spec = get_task(task)
        user_ids = read_user_ids(users) if users else split_users(store, task_spec, split)
    with progress_bar(enabled=not json_out) as tick:
        result = assemble_users(
            store, lambda: load_llm(llm, device), task_spec, user_ids, top_k, pool, batch_size, max_length, tick, precision, max_items,
            running_on, history_format,
        )  # fmt: skip
    if json_out:
        print_json({
            "task": task_spec.name, "pool": result.pool, "pool_version": result.pool_version, "top_k": result.top_k,
            "users": {u: {"seconds": result.seconds[u], "stored_bytes": result.stored_bytes[u],
                          "sharer_mass": sharer_mass(c), **({"modules": _choices_json(c)} if explain else {})}
                      for u, c in result.assembled.items()},
            "skipped": result.skipped,
        })  # fmt: skip
        return
    table = Table("user", "heaviest sharers (share of weight)", "seconds", "stored", title=f"assembled against {result.pool} (top-{top_k})")
    for user_id, choices in result.assembled.items():
        mass = sharer_mass(choices)
        top = ", ".join(f"{s} {w:.0%}" for s, w in list(mass.items())[:4])
        table.add_row(user_id, top, f"{result.seconds[user_id]:.2f}", human_bytes(result.stored_bytes[user_id]))
    console.print(table)
    for skipped, reason in list(result.skipped.items())[:5]:
        console.print(f"skipped user {skipped}: {reason}")
    if explain:
        for user_id, choices in result.assembled.items():
            console.print(_explain_table(user_id, choices))


def _choices_json(choices: Choices) -> dict[str, list[dict]]:
    return {path: [{"sharer": s, "weight": round(w, 5)} for s, w in picked] for path, picked in choices.items()}


def _explain_table(user_id: str, choices: Choices) -> Table:
    """One row per layer, one column per module kind: the chosen sharers with their weights."""
    from recipes.methods.perpcs.pool import layer_of

    kinds = sorted({path.rsplit(".", 1)[-1] for path in choices})
    table = Table("layer", *kinds, title=f"user {user_id}: chosen pieces per layer (sharer:weight)")
    layers: dict[Optional[int], dict[str, str]] = {}
    for path, picked in choices.items():
        cell = " ".join(f"{s}:{w:.2f}" for s, w in picked)
        layers.setdefault(layer_of(path), {})[path.rsplit(".", 1)[-1]] = cell
    for layer in sorted(layers, key=lambda x: (x is None, x or 0)):
        table.add_row("-" if layer is None else str(layer), *(layers[layer].get(k, "") for k in kinds))
    return table


# ---------- persona pool ----------

app = typer.Typer(help="The shared piece pool: versions, tags, sharers, and exports of assembled adapters.", no_args_is_help=True)


@app.command("list")
@handle_errors
def pool_list(ctx: typer.Context, task: Optional[str] = typer.Option(None, "--task"), json_out: bool = JsonOption) -> None:
    """Tagged pool versions, oldest first, with their sharers, pieces and bytes."""
    from recipes.methods.perpcs.pool import pool_summary

    store = open_store(ctx)
    rows = []
    for version in store.pool_versions():
        summary = pool_summary(store, str(version.version), task)
        per_task = {t: len(v["sharers"]) for t, v in summary["tasks"].items()}
        rows.append({"version": version.version, "tags": version.tags, "created_at": version.created_at,
                     "sharers": per_task, "pieces": summary["pieces"], "bytes": summary["bytes"]})  # fmt: skip
    if json_out:
        print_json({"versions": rows})
        return
    if not rows:
        console.print("the pool is empty (run `persona register-sharers`)")
        return
    table = Table("version", "tags", "created", "sharers", "pieces", "size", title="piece pool")
    for row in rows:
        sharers = ", ".join(f"{t}: {n}" for t, n in row["sharers"].items())
        created = row["created_at"].strftime("%Y-%m-%d %H:%M") if row["created_at"] else "-"
        table.add_row(str(row["version"]), ", ".join(row["tags"]), created, sharers, str(row["pieces"]), human_bytes(row["bytes"]))
    console.print(table)


@app.command("show")
@handle_errors
def pool_show(
    ctx: typer.Context,
    ref: Optional[str] = typer.Argument(None, help="Tag or version (default: the newest)."),
    task: Optional[str] = typer.Option(None, "--task"),
    json_out: bool = JsonOption,
) -> None:
    """One pool version: its sharers (pieces, bytes, training seconds) and pieces per module kind."""
    from recipes.methods.perpcs.pool import pool_summary

    summary = pool_summary(open_store(ctx), ref, task)
    if json_out:
        print_json(summary)
        return
    console.print(f"pool version {summary['version']} ({', '.join(summary['tags']) or 'untagged'}): "
                  f"{summary['pieces']} pieces, {human_bytes(summary['bytes'])}")  # fmt: skip
    for task_name, entry in summary["tasks"].items():
        modules = ", ".join(f"{kind} {n}" for kind, n in sorted(entry["modules"].items()))
        console.print(f"[bold]{task_name}[/] on base {entry['base'] or '(bare LLM)'}, LLM {entry['llm']}, {entry['gates']} gates; pieces per module kind: {modules}")
        table = Table("sharer", "pieces", "size", "history", "LoRA s", "gate s", "gate loss", "registered in")
        for sharer, info in entry["sharers"].items():
            gate_loss = f"{info['gate_first_loss']} → {info['gate_final_loss']}" if info.get("gate_final_loss") is not None else "-"
            table.add_row(sharer, str(info["pieces"]), human_bytes(info["bytes"]), str(info.get("examples", "-")),
                          str(info.get("lora_seconds", "-")), str(info.get("gate_seconds", "-")), gate_loss,
                          f"pool-{info['registration']}")  # fmt: skip
        console.print(table)


@app.command("tag")
@handle_errors
def pool_tag(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Tag or version to name."),
    tag: str = typer.Argument(..., help="The new tag."),
    json_out: bool = JsonOption,
) -> None:
    """Give a pool version one more tag (e.g. the version a paper's numbers were made with)."""
    store = open_store(ctx)
    version = store.resolve_pool(ref)
    store.tag_pool(version.version, tag)
    if json_out:
        print_json({"version": version.version, "tag": tag})
        return
    console.print(f"tagged pool version {version.version} as [bold]{tag}[/]")


@app.command("diff")
@handle_errors
def pool_diff_command(
    ctx: typer.Context,
    old: str = typer.Argument(..., help="Older tag or version."),
    new: str = typer.Argument(..., help="Newer tag or version."),
    task: Optional[str] = typer.Option(None, "--task"),
    json_out: bool = JsonOption,
) -> None:
    """Sharers and pieces added, removed or re-registered between two pool versions."""
    from recipes.methods.perpcs.pool import pool_diff

    diff = pool_diff(open_store(ctx), old, new, task)
    if json_out:
        print_json(diff)
        return
    console.print(f"version {diff['old']['version']} → {diff['new']['version']}: pieces +{diff['pieces_added']} "
                  f"-{diff['pieces_removed']} replaced {diff['pieces_replaced']}")  # fmt: skip
    for key, label in (("sharers_added", "added"), ("sharers_removed", "removed"), ("sharers_retrained", "re-registered")):
        if diff[key]:
            console.print(f"sharers {label}: {', '.join(diff[key])}")


@app.command("export")
@handle_errors
def pool_export(
    ctx: typer.Context,
    directory: Path = typer.Argument(..., help="New folder for the peft adapter."),
    user: str = typer.Option(..., "--user", help="The target user whose assembled adapter to export."),
    task: Optional[str] = typer.Option(None, "--task"),
    pool: Optional[str] = PoolOption,
    json_out: bool = JsonOption,
) -> None:
    """Write a user's assembled adapter (pieces concatenated, rank k·r, the base folded in) as a peft folder."""
    from recipes.flows.answer import user_task
    from recipes.methods.perpcs.assembly import export_assembly

    store = open_store(ctx)
    facts = export_assembly(store, user_task(store, user, task), user, str(directory), pool)
    if json_out:
        print_json(facts)
        return
    console.print(f"wrote {facts['directory']}: user {user}'s adapter against pool {facts['pool']} "
                  f"(rank {facts['rank']}, {facts['modules']} modules"
                  + (f", {', '.join(facts['folded_bases'])} folded in" if facts["folded_bases"] else "") + ")")  # fmt: skip
