"""What training learns from: a split's queries or a user's history as examples, and where an
interrupted training keeps its checkpoint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from recipes import PersonaError
from recipes.kit.backbones import Encoder, cache_dir
from recipes.kit.history_pairs import given_pair, history_pairs
from recipes.kit.prompts import TokenBudget, history_prompt
from recipes.kit.retrieval import bm25_items, input_vectors, similar_items
from recipes.kit.training_loop import Example
from recipes.kit.splits import query_split
from recipes.kit.tasks import Task
from store import Behavior, Query, Store


def query_examples(queries: list[Query]) -> list[Example]:
    """(prompt, gold) pairs: the task's own k=0 prompt and the user's answer."""
    return [Example(q.input, q.output) for q in queries if q.output is not None]


def history_examples(task: Task, history: list[Behavior], as_text: bool = False) -> list[Example]:
    """A user's history as training examples: in task format when an item has an input (its
    text being the user's output), else (and for every item `as_text`) language modelling on the
    item's text."""
    examples = []
    for item in history:
        given = None if as_text else given_pair(task, item)
        examples.append(Example(*given) if given else Example(None, item.text))
    return examples


def train_user_pairs(
    store: Store, task: Task, user_ids: list[str], recipe: str, seed: int, retrieval: Optional[Retrieval] = None
) -> list[Example]:
    """Task-format pairs made from these (training) users' history items; none for recipe `none`.
    With `retrieval`, each pair's prompt shows the user's other items the way `rag` serves them."""
    if recipe == "none":
        return []
    histories = store.histories(user_ids, task.name, with_vectors=retrieval is not None and retrieval.by_vector)
    pairs = history_pairs(store, task, histories, recipe, seed)
    user_pairs = [(user, p) for user in user_ids for p in pairs.get(user, [])]
    if retrieval is None:
        return [Example(p.input, p.output) for _, p in user_pairs]
    vectors = retrieval.query_vectors([p.input for _, p in user_pairs])
    return [
        Example(retrieval.prompt(p.input, [item for item in histories.get(user, []) if item.item_id != p.item_id], vector), p.output)
        for (user, p), vector in zip(user_pairs, vectors)
    ]


@dataclass(frozen=True)
class Retrieval:
    """Training prompts with retrieved history, built exactly as the `rag` method (BM25, and with
    `min_similarity` only items that alike to the input by `encoder`) serves them, so a model
    trained on them reads the same prompt format at serving time."""

    task: Task
    budget: TokenBudget
    k: int
    min_similarity: Optional[float] = None
    encoder: Optional[Encoder] = None

    @property
    def by_vector(self) -> bool:
        return self.min_similarity is not None

    def query_vectors(self, task_inputs: list[str]) -> list[Optional[np.ndarray]]:
        """The inputs' query vectors when the threshold needs them, else None for each."""
        if not self.by_vector or not task_inputs:
            return [None] * len(task_inputs)
        if self.encoder is None:
            raise PersonaError("--rag-min-similarity needs the store's encoder")
        return list(input_vectors(self.encoder, self.task, task_inputs))

    def prompt(self, task_input: str, history: list[Behavior], query_vector: Optional[np.ndarray] = None) -> str:
        items = bm25_items(self.task, task_input, history, self.k)
        if self.min_similarity is not None:
            items = similar_items(items, query_vector, self.min_similarity)
        return history_prompt(self.task, task_input, items, self.budget)

    def query_examples(self, store: Store, queries: list[Query]) -> list[Example]:
        """(RAG prompt, gold) pairs of queries with gold outputs: the user's whole history to retrieve from."""
        queries = [q for q in queries if q.output is not None]
        histories = store.histories(sorted({q.user_id for q in queries}), self.task.name, with_vectors=self.by_vector)
        vectors = self.query_vectors([q.input for q in queries])
        return [Example(self.prompt(q.input, histories.get(q.user_id, []), v), q.output) for q, v in zip(queries, vectors)]


def split_queries(store: Store, task: Task, split: str) -> list[Query]:
    """Queries of a task with gold outputs whose users fall in `split` (train, dev or test)."""
    return [q for q in store.task_queries(task.name) if q.output is not None and query_split(q.split, q.user_id) == split]


def checkpoint_path(store: Store, name: str) -> Path:
    """Where an interrupted training of plug-in `name` in this store keeps its checkpoint."""
    key = hashlib.sha256(f"{store.uri}\n{name}".encode()).hexdigest()[:16]
    return cache_dir() / "checkpoints" / f"{key}.pt"
