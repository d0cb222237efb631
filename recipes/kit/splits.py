"""The fixed user-level split every method shares: a user's queries are all train, dev or test.

A user's split is a pure function of the user id (a SHA-256 bucket), so it does not depend
on which users were ingested, in what order, or on which machine. A split recorded on the
query at ingest time (`--split`, or `split` in users.jsonl) overrides it.
"""

from __future__ import annotations

import hashlib

from recipes import PersonaError
from recipes.kit.tasks import Task
from store import Store, id_sort_key

SPLITS = ("train", "dev", "test")
FRACTIONS = {"train": 0.7, "dev": 0.1, "test": 0.2}
_SALT = "persona-user-split-v1:"


def user_split(user_id: str) -> str:
    """'train' (70%), 'dev' (10%) or 'test' (20%) for this user id, the same everywhere."""
    digest = hashlib.sha256((_SALT + user_id).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    if bucket < FRACTIONS["train"]:
        return "train"
    if bucket < FRACTIONS["train"] + FRACTIONS["dev"]:
        return "dev"
    return "test"


def query_split(recorded: str | None, user_id: str) -> str:
    """The split of one query: the one recorded at ingest if any, else its user's."""
    return recorded or user_split(user_id)


def split_users(store: Store, task: Task, split: str) -> list[str]:
    """Users with queries of `task` in a split of the fixed user-level split ('all' for every user
    with queries), in natural id order."""
    users = {q.user_id for q in store.task_queries(task.name) if split == "all" or query_split(q.split, q.user_id) == split}
    if not users:
        raise PersonaError(f"store {store.uri} has no {task.name} users in split '{split}'")
    return sorted(users, key=id_sort_key)
