"""The persistent user store: the only package that talks to LanceDB.

Everything the toolkit keeps (users, history items and their vectors, queries) lives in one
LanceDB directory. Callers use the typed functions here and never see a LanceDB object.
"""

from typing import Any

from store.memory import bound_malloc_arenas

bound_malloc_arenas()  # before LanceDB is imported and starts its threads

from store.errors import StoreError  # noqa: E402
from store.sql import id_sort_key
from store.records import AssemblyRecord, Behavior, BehaviorBatch, HistoryPair, Piece, Plugin, PoolVersion, Prediction, Profile, Query, Run, SearchHit, UserRow

__all__ = [
    "Store",
    "StoreError",
    "FORMAT_VERSION",
    "default_store_path",
    "id_sort_key",
    "Behavior",
    "BehaviorBatch",
    "Query",
    "UserRow",
    "SearchHit",
    "Profile",
    "HistoryPair",
    "Prediction",
    "Run",
    "Plugin",
    "Piece",
    "PoolVersion",
    "AssemblyRecord",
]

_DB_NAMES = ("Store", "default_store_path", "FORMAT_VERSION")
"""Imported from store.db (and so LanceDB, a second of start-up) when first used, so that the
records, the errors and a CLI's help do not wait for it."""


def __getattr__(name: str) -> Any:
    if name in _DB_NAMES:
        from store import db

        value = getattr(db, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'store' has no attribute '{name}'")
