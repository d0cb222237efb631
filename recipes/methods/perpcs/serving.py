"""Per-Pcs served: each target user's stored assembly (the pool's pieces it chose, with weights)
mixed into one adapter per user; the ablation mixes every sharer's pieces with equal weight."""

from __future__ import annotations

from recipes import PersonaError
from recipes.kit.serving_plan import ServingPlan
from recipes.kit.tasks import Task
from recipes.methods.perpcs.pool import decode_choices, pool_label, pool_plan, read_pool, uniform_choices
from recipes.methods.registry import Method, MethodOptions, register
from store import Store

ABLATION = "uniform gates: every sharer's pieces, equal weights"
UNIFORM = "uniform"  # the one adapter of the ablation, served to every user


def serve_perpcs(store: Store, task: Task, user_ids: list[str], options: MethodOptions) -> ServingPlan:
    version = store.resolve_pool(options.pool)
    pool = read_pool(store, task.name, version)
    if options.ablation:
        uniform = uniform_choices(pool)
        return pool_plan(store, pool, [UNIFORM] * len(user_ids), lambda: {UNIFORM: uniform}, {"ablation": ABLATION})
    wanted = sorted(set(user_ids))
    records = store.get_assemblies(task.name, wanted, version.version)
    missing = [u for u in wanted if u not in records]
    label = pool_label(version)
    if missing:
        raise PersonaError(
            f"{len(missing)} of {len(wanted)} users have no assembly against pool {label}, e.g. user '{missing[0]}'"
            f" (run `persona assemble --task {task.name} --pool {label} --user {missing[0]}`, or --split/--users for many)"
        )
    ks = {r.top_k for r in records.values()}
    if options.top_k is not None and ks != {options.top_k}:
        raise PersonaError(f"the stored assemblies use top-k {sorted(ks)}; assemble again with --top-k {options.top_k}")
    load = lambda: {u: decode_choices(pool, r.choice) for u, r in records.items()}  # noqa: E731
    return pool_plan(store, pool, list(user_ids), load, {"top_k": sorted(ks)})


register(Method(
    name="perpcs", summary="each user's adapter assembled from sharers' gated pieces, without training",
    needs="a piece pool and the users' assemblies (--pool, default the newest)", trained_by="persona register-sharers, persona assemble",
    plan=serve_perpcs, options=("pool", "top_k"), ablation=ABLATION, personal=True,
))  # fmt: skip
