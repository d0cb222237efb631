"""PEFT retrieval, the baseline Per-Pcs is compared with: each target user gets the whole adapters
of the k sharers whose histories are most like theirs (cosine of mean history vectors), mixed
with softmax weights; no gates, no piece-level choice, nothing trained or stored per user.
"""

from __future__ import annotations

import numpy as np

from recipes import PersonaError
from recipes.kit.retrieval import user_embedding
from recipes.kit.serving_plan import ServingPlan
from recipes.kit.tasks import Task
from recipes.methods.perpcs.pool import Choices, Pool, load_pool, pool_plan
from recipes.methods.registry import Method, MethodOptions, register
from store import Store

DEFAULT_TOP_K = 3


def retrieval_choices(pool: Pool, target: np.ndarray, sharer_embeddings: dict[str, np.ndarray], top_k: int) -> Choices:
    """Whole adapters of the k sharers most similar to the target (cosine of user embeddings),
    weighted by a softmax over those cosines; the same mix at every module."""
    sharers = [s for s in pool.sharers if s in sharer_embeddings]
    if not sharers:
        raise PersonaError(f"no sharer of pool {pool.label} has a history in the store")
    matrix = np.stack([sharer_embeddings[s] for s in sharers])
    cosines = matrix @ target / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(target) + 1e-12)
    top = np.argsort(-cosines, kind="stable")[:top_k]
    weights = np.exp(cosines[top] - cosines[top].max())
    weights /= weights.sum()
    mix = [(sharers[i], float(w)) for i, w in zip(top, weights)]
    choices: Choices = {}
    for path, module in pool.modules.items():
        picked = [(s, w) for s, w in mix if s in module.sharers]
        if picked:
            choices[path] = picked
    return choices


def serve_peft_retrieval(store: Store, task: Task, user_ids: list[str], options: MethodOptions) -> ServingPlan:
    pool = load_pool(store, task.name, options.pool)
    top_k = options.top_k or DEFAULT_TOP_K
    histories = store.histories(sorted(set(user_ids) | set(pool.sharers)), task.name, with_vectors=True)
    embeddings = {u: user_embedding([item.vector for item in items]) for u, items in histories.items()}
    missing = [u for u in user_ids if u not in embeddings]
    if missing:
        raise PersonaError(f"user '{missing[0]}' has no {task.name} history to compare with the sharers")
    sharers = {s: embeddings[s] for s in pool.sharers if s in embeddings}
    load = lambda: {u: retrieval_choices(pool, embeddings[u], sharers, top_k) for u in set(user_ids)}  # noqa: E731
    return pool_plan(store, pool, list(user_ids), load, {"top_k": top_k})


register(Method(
    name="peft-retrieval", summary="whole adapters of the k sharers most like the user (--top-k, default 3), softmax-mixed",
    needs="a piece pool (--pool, default the newest)", trained_by="persona register-sharers",
    plan=serve_peft_retrieval, options=("pool", "top_k"), personal=True,
    label=lambda options, prompt: f"peft-retrieval-k{options.top_k or DEFAULT_TOP_K}",
))  # fmt: skip
