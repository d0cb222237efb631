"""PPlug served: every query gets one soft token made by the stored user embedder from the query
and its user's history vectors, in front of its prompt; the ablation makes it from another
user's history. Also `explain`: which history items a user's embedding draws on.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from recipes import PersonaError
from recipes.kit.backbones import LLM, Encoder, load_encoder
from recipes.kit.plugins import base_chain, check_llm
from recipes.kit.retrieval import donors
from recipes.kit.serving_plan import ServingPlan
from recipes.kit.soft_prompts import SoftTokens
from recipes.kit.tasks import Task
from recipes.methods.pplug.model import EmbedderShape, UserEmbedder, pad_histories
from recipes.methods.pplug.training import PPLUG, check_encoder, history_vectors, pplug_name, require_histories
from recipes.methods.registry import Method, MethodOptions, register
from store import Plugin, Query, Store

ABLATION = "another user's history (seeded derangement)"

def get_pplug(store: Store, name: str) -> Plugin:
    plugin = store.get_plugin(name)
    if plugin.kind != PPLUG:
        raise PersonaError(f"plug-in '{name}' is a {plugin.kind}, not a PPlug embedder")
    return plugin


def load_embedder(plugin: Plugin, device: str | torch.device = "cpu", encoder: Optional[Encoder] = None) -> UserEmbedder:
    """The stored embedder, ready to make soft tokens (its input encoder built from the recorded encoder)."""
    encoder = encoder or load_encoder(plugin.encoder, str(device))
    embedder = UserEmbedder(encoder.model, EmbedderShape(**plugin.config["shape"]))
    try:
        embedder.load_bytes(plugin.weights)
    except ValueError as exc:
        raise PersonaError(f"plug-in '{plugin.name}': {exc}") from None
    return embedder.to(device).eval()


@torch.inference_mode()
def soft_tokens(embedder: UserEmbedder, texts: list[str], histories: list[np.ndarray], batch_size: int = 64) -> SoftTokens:
    """Soft tokens for each input given its user's history vectors (rows follow `texts`)."""
    rows = []
    for start in range(0, len(texts), batch_size):
        history, mask = pad_histories(histories[start : start + batch_size], embedder.device)
        rows.append(embedder(texts[start : start + batch_size], history, mask).float())
    return SoftTokens(torch.cat(rows) if rows else torch.zeros(0, embedder.shape.n_soft, embedder.shape.llm_dim))


def query_soft_tokens(
    plugin: Plugin, llm: LLM, task: Task, queries: list[Query], vectors: dict[str, np.ndarray], donor: Optional[dict[str, str]] = None
) -> SoftTokens:
    """The soft tokens of each query from its user's history vectors (`history_vectors`), with the
    stored embedder (a user ingested after training needs nothing else). With `donor`, a query is
    served with its donor's history instead of its own user's (the non-personal ablation)."""
    check_llm([plugin], llm.id)
    embedder = load_embedder(plugin, llm.device)
    owners = [donor[q.user_id] if donor else q.user_id for q in queries]
    none = np.zeros((0, embedder.shape.encoder_dim), dtype=np.float32)  # --no-personal reads no history
    return soft_tokens(embedder, [task.query_text(q.input) for q in queries], [vectors.get(u, none) for u in owners])


# ---------- explanation ----------


@torch.inference_mode()
def explain(store: Store, task: Task, user_id: str, text: str, name: str, top: int = 5, device: str = "cpu") -> dict:
    """Which of the user's history items the personal embedding draws on for this input, and how much."""
    if top < 1:
        raise PersonaError(f"--top must be at least 1, got {top}")
    if not text.strip():
        raise PersonaError("the input text is empty")
    plugin = get_pplug(store, name)
    store.require_users([user_id])
    check_encoder(store, plugin.encoder)
    shape = EmbedderShape(**plugin.config["shape"])
    if not shape.personal:
        raise PersonaError(f"plug-in '{name}' was trained without a personal token (--no-personal): it reads no history")
    items = store.histories([user_id], task.name, with_vectors=True).get(user_id, [])[-shape.history_cap :]
    if not items:
        raise PersonaError(f"user '{user_id}' has no {task.name} history")
    embedder = load_embedder(plugin, device)
    history, mask = pad_histories([np.stack([i.vector for i in items]).astype(np.float32)], embedder.device)
    inputs = embedder.encode_inputs([task.query_text(text)]) if shape.pooling == "attention" else torch.zeros(1, history.shape[-1])
    weights = embedder.weights(inputs.to(embedder.device), history, mask)[0].cpu()
    order = torch.argsort(weights, descending=True)[:top].tolist()
    n = len(items)
    entropy = float(-(weights * weights.clamp_min(1e-12).log()).sum())
    return {
        "user_id": user_id, "task": task.name, "plugin": name, "pooling": shape.pooling, "history_items": n,
        "uniform_weight": round(1 / n, 6), "max_weight": round(float(weights.max()), 6),
        "effective_items": round(math.exp(entropy), 2),
        "items": [
            {"rank": r + 1, "item_id": items[i].item_id, "weight": round(float(weights[i]), 6), "text": items[i].text,
             "timestamp": items[i].timestamp.isoformat() if items[i].timestamp else None}
            for r, i in enumerate(order)
        ],
    }  # fmt: skip


def serve_pplug(store: Store, task: Task, user_ids: list[str], options: MethodOptions) -> ServingPlan:
    name = options.plugin or pplug_name(task)
    plugin = get_pplug(store, name)
    check_encoder(store, plugin.encoder)
    if plugin.task not in (None, task.name):
        raise PersonaError(f"plug-in '{name}' was trained for {plugin.task}, not {task.name}")
    shape = EmbedderShape(**plugin.config["shape"])
    if options.ablation and not shape.personal:
        raise PersonaError(f"plug-in '{name}' has no personal token; it is an ablation already")
    donor = donors(user_ids, options.seed, "pplug", options.served) if options.ablation else None
    vectors: dict[str, np.ndarray] = {}  # read once, here; --no-personal reads no history
    if shape.personal:
        owners = sorted({donor[u] for u in user_ids}) if donor else user_ids
        vectors = history_vectors(store, task, owners, shape.history_cap)
        require_histories(vectors, owners, task)
    details = {"pplug": name, "pooling": shape.pooling, **({"ablation": ABLATION} if donor else {})}
    return ServingPlan(
        chain=base_chain(store, plugin.base), details=details,
        soft=lambda llm, queries: query_soft_tokens(plugin, llm, task, queries, vectors, donor),
    )  # fmt: skip


register(Method(
    name=PPLUG, summary="one soft token per query from a trained embedder of the query and the user's history",
    needs="a trained user embedder (--plugin, default pplug-TASK)", trained_by="persona train-embedder",
    plan=serve_pplug, options=("plugin",), ablation=ABLATION, donor_ablation=True, personal=True,
))  # fmt: skip
