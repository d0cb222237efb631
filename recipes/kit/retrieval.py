"""Choosing items of one user's history for a prompt: BM25, recency, dense vectors, or at random.

Every retriever returns positions into the history list it was given (best first), so
prompting does not care which one ran. One user's history is searched at a time: the user's own,
or for an ablation a donor's (`donors`), never a mix.
"""

from __future__ import annotations

import hashlib
import logging
import random as random_module

import bm25s
import numpy as np

from recipes import PersonaError
from recipes.kit.backbones import Encoder
from recipes.kit.tasks import Task
from store import Behavior, SearchHit, Store

RETRIEVERS = ("bm25", "recency", "dense")
logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG


def dense_search(store: Store, encoder: Encoder, user_id: str, text: str, k: int = 5, task: str | None = None) -> list[SearchHit]:
    """The k items of `user_id`'s history nearest to `text` by cosine (store-side vector search)."""
    if store.get_user(user_id) is None:
        raise PersonaError(f"no user '{user_id}' in store {store.uri}")
    store.check_encoder(encoder.id, encoder.dim)
    if k < 1:
        raise PersonaError(f"--k must be at least 1, got {k}")
    vector = encoder.encode([text])[0]
    return store.search_history(user_id, vector, k=k, task=task)


def bm25_top(documents: list[str], query: str, k: int) -> list[int]:
    """Positions of the k documents BM25 ranks highest for `query` (ties keep history order)."""
    k = min(k, len(documents))
    if k == 0:
        return []
    query_tokens = bm25s.tokenize(query, stopwords="en", return_ids=False, show_progress=False)[0]
    corpus_tokens = bm25s.tokenize(documents, stopwords="en", return_ids=False, show_progress=False)
    if not query_tokens or not any(corpus_tokens):  # nothing to match on: keep the history order
        return list(range(k))
    index = bm25s.BM25()
    index.index(corpus_tokens, show_progress=False)
    scores = index.get_scores(query_tokens)
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:k]]


def bm25_items(task: Task, task_input: str, history: list[Behavior], k: int) -> list[Behavior]:
    """The k history items BM25 ranks highest for the query part of a task input, best first:
    what `rag` shows, and what a task LoRA trained with --rag-k learns to read."""
    positions = bm25_top([item.text for item in history], task.query_text(task_input), k)
    return [history[i] for i in positions]


def recency_top(history: list[Behavior], k: int) -> list[int]:
    """Positions of the k most recent items, newest first (history is oldest first; items without
    a timestamp count as ordered by their ids, as ingested)."""
    return list(range(len(history) - 1, -1, -1))[:k]


def dense_top(history: list[Behavior], query_vector: np.ndarray, k: int) -> list[int]:
    """Positions of the k items whose stored vectors are nearest the query vector by cosine."""
    if not history:
        return []
    if any(item.vector is None for item in history):
        raise PersonaError("dense retrieval needs the history's stored vectors")
    matrix = np.stack([item.vector for item in history])
    return [int(i) for i in np.argsort(-(matrix @ query_vector), kind="stable")[:k]]


def input_vectors(encoder: Encoder, task: Task, task_inputs: list[str]) -> np.ndarray:
    """The vectors dense retrieval and --min-similarity compare items with: the query part of each
    task input, encoded (one rule for training and serving prompts)."""
    return encoder.encode([task.query_text(text) for text in task_inputs])


def similar_items(items: list[Behavior], query_vector: np.ndarray, min_similarity: float) -> list[Behavior]:
    """The items (order kept) whose stored vectors have cosine >= `min_similarity` with the query's:
    a retrieved item unrelated to the query is left out rather than shown as if it were relevant
    (LaMP-7 train and dev queries: BM25's first item passes 0.4 for 18% of them from the user's own
    history, for 3% from another user's; benchmarks/lamp/similarity.py)."""
    if any(item.vector is None for item in items):
        raise PersonaError("--min-similarity needs the history's stored vectors")
    return [item for item in items if float(np.dot(item.vector, query_vector)) >= min_similarity]


def random_items(n_items: int, k: int, seed: int, key: str) -> list[int]:
    """k distinct random positions, the same for the same (seed, key) on every run and machine."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    rng = random_module.Random(int.from_bytes(digest[:8], "big"))
    return rng.sample(range(n_items), min(k, n_items))


def donors(user_ids: list[str], seed: int, method: str, served: tuple[str, ...] = ()) -> dict[str, str]:
    """Each user's donor for a non-personal ablation: another user of the set, every user donating
    once (a seeded derangement), so the ablation sees real histories, just never the user's own.
    The set is `served` when given (every user of a command answered in parts, e.g. a Ray shard's
    users among them), so each part gets the donors the whole would."""
    users = sorted(set(served or user_ids))
    if len(users) < 2:
        raise PersonaError(f"--ablation of {method} serves each user with another user's history; it needs at least 2 users")
    random_module.Random(seed).shuffle(users)
    return {user: users[(i + 1) % len(users)] for i, user in enumerate(users)}


def user_embedding(vectors: list[np.ndarray]) -> np.ndarray:
    """E_u: the mean of a user's (normalized) history vectors."""
    return np.mean(np.stack(vectors), axis=0)
