"""What training learns from: a split's queries or a user's history as examples, and where an
interrupted training keeps its checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

from recipes.kit.backbones import cache_dir
from recipes.kit.history_pairs import given_pair, history_pairs
from recipes.kit.training_loop import Example
from recipes.kit.splits import query_split
from recipes.kit.tasks import Task
from store import Behavior, Query, Store


def query_examples(queries: list[Query]) -> list[Example]:
    """(prompt, gold) pairs: the task's own k=0 prompt and the user's answer."""
    return [Example(q.input, q.output) for q in queries if q.output is not None]


def history_examples(task: Task, history: list[Behavior]) -> list[Example]:
    """A user's history as training examples: in task format when an item has an input (its
    text being the user's output), else language modelling on the item's text."""
    examples = []
    for item in history:
        given = given_pair(task, item)
        examples.append(Example(*given) if given else Example(None, item.text))
    return examples


def train_user_pairs(store: Store, task: Task, user_ids: list[str], recipe: str, seed: int) -> list[Example]:
    """Task-format pairs made from these (training) users' history items; none for recipe `none`."""
    if recipe == "none":
        return []
    pairs = history_pairs(store, task, store.histories(user_ids, task.name), recipe, seed)
    return [Example(p.input, p.output) for user in user_ids for p in pairs.get(user, [])]


def split_queries(store: Store, task: Task, split: str) -> list[Query]:
    """Queries of a task with gold outputs whose users fall in `split` (train, dev or test)."""
    return [q for q in store.task_queries(task.name) if q.output is not None and query_split(q.split, q.user_id) == split]


def checkpoint_path(store: Store, name: str) -> Path:
    """Where an interrupted training of plug-in `name` in this store keeps its checkpoint."""
    key = hashlib.sha256(f"{store.uri}\n{name}".encode()).hexdigest()[:16]
    return cache_dir() / "checkpoints" / f"{key}.pt"
