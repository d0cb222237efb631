"""Arrow schemas of the store's tables. A change here is a change of FORMAT_VERSION."""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us")

META = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("value", pa.string())])

USERS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("n_items", pa.int64()),
        pa.field("n_queries", pa.int64()),
        pa.field("first_ts", TS),
        pa.field("last_ts", TS),
        pa.field("profile", pa.string()),
        pa.field("metadata", pa.string()),
    ]
)

QUERIES = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("input", pa.string(), nullable=False),
        pa.field("output", pa.string()),
        pa.field("split", pa.string()),
    ]
)


def behaviors(dim: int) -> pa.Schema:
    """The history-item table; its vector width is fixed by the store's encoder."""
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("task", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("fields", pa.string()),
            pa.field("timestamp", TS),
            pa.field("vector", pa.list_(pa.float32(), dim)),
            pa.field("encoder", pa.string(), nullable=False),
        ]
    )


USER_KEY = ["user_id"]
BEHAVIOR_KEY = ["user_id", "task", "item_id"]
QUERY_KEY = ["task", "query_id"]

PROFILES = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("llm", pa.string(), nullable=False),
        pa.field("instruction", pa.string()),
        pa.field("n_items", pa.int64()),
        pa.field("text", pa.string(), nullable=False),
        pa.field("created_at", TS),
    ]
)

PAIRS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("recipe", pa.string(), nullable=False),
        pa.field("source_digest", pa.string(), nullable=False),
        pa.field("input", pa.string(), nullable=False),
        pa.field("output", pa.string(), nullable=False),
        pa.field("created_at", TS),
    ]
)
PAIR_KEY = ["user_id", "task", "item_id", "recipe"]

RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("llm", pa.string()),
        pa.field("created_at", TS),
        pa.field("n_examples", pa.int64()),
        pa.field("wall_s", pa.float64()),
        pa.field("examples_per_s", pa.float64()),
        pa.field("config", pa.string()),
        pa.field("metrics", pa.string()),
    ]
)

PREDICTIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("output", pa.string()),
        pa.field("raw", pa.string()),
        pa.field("gold", pa.string()),
    ]
)

PROFILE_KEY = ["user_id", "task", "llm"]
RUN_KEY = ["run_id"]

PLUGINS = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("llm", pa.string(), nullable=False),
        pa.field("encoder", pa.string()),
        pa.field("base", pa.string()),
        pa.field("config", pa.string()),
        pa.field("weights", pa.large_binary()),
        pa.field("metrics", pa.string()),
        pa.field("created_at", TS),
    ]
)

PLUGIN_KEY = ["name"]

PIECES = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("sharer_id", pa.string(), nullable=False),
        pa.field("module", pa.string(), nullable=False),
        pa.field("layer", pa.int64()),
        pa.field("r", pa.int64(), nullable=False),
        pa.field("alpha", pa.float64(), nullable=False),
        pa.field("llm", pa.string(), nullable=False),
        pa.field("base", pa.string()),
        pa.field("tensors", pa.large_binary(), nullable=False),
        pa.field("registration", pa.int64(), nullable=False),
        pa.field("config", pa.string()),
        pa.field("metrics", pa.string()),
        pa.field("created_at", TS),
    ]
)

PIECE_KEY = ["task", "sharer_id", "module"]

ASSEMBLIES = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("pool_version", pa.int64(), nullable=False),
        pa.field("top_k", pa.int64(), nullable=False),
        pa.field("llm", pa.string(), nullable=False),
        pa.field("base", pa.string()),
        pa.field("choice", pa.large_binary(), nullable=False),
        pa.field("config", pa.string()),
        pa.field("seconds", pa.float64()),
        pa.field("created_at", TS),
    ]
)

ASSEMBLY_KEY = ["task", "user_id", "pool_version"]
