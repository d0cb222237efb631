"""Plain typed records that cross the store boundary (no Arrow, no LanceDB)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np


@dataclass
class Behavior:
    """One history item of one user, with its encoder vector."""

    item_id: str
    user_id: str
    task: str
    text: str
    fields: dict[str, Any] = field(default_factory=dict)
    timestamp: datetime | None = None
    vector: np.ndarray | None = None
    encoder: str = ""


@dataclass
class BehaviorBatch:
    """Many history items as columns, for bulk writers (ingest, benchmarks): one record per item
    costs more Python time than LanceDB takes to write the item. `vectors` is (n, dim); `fields`
    and `timestamps`, when given, hold one entry per item."""

    item_ids: list[str]
    user_ids: list[str]
    tasks: list[str]
    texts: list[str]
    vectors: np.ndarray
    fields: list[dict[str, Any]] | None = None
    timestamps: list[datetime | None] | None = None

    @classmethod
    def of(cls, items: list[Behavior], vectors: np.ndarray) -> "BehaviorBatch":
        """These items (their own vectors ignored) with one row of `vectors` each."""
        return cls(
            [b.item_id for b in items], [b.user_id for b in items], [b.task for b in items], [b.text for b in items],
            vectors, [b.fields for b in items], [b.timestamp for b in items],
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass
class Query:
    """One question a user asked (LaMP: one question), with its gold output when known."""

    query_id: str
    user_id: str
    task: str
    input: str
    output: str | None = None
    split: str | None = None


@dataclass
class UserRow:
    """Per-user summary kept in the `users` table."""

    user_id: str
    n_items: int
    n_queries: int
    first_ts: datetime | None = None
    last_ts: datetime | None = None
    profile: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchHit:
    """A history item found by vector search, with its cosine similarity to the query."""

    item: Behavior
    score: float


@dataclass
class Profile:
    """A PAG profile of one user for one task, written by one LLM from `n_items` history items."""

    user_id: str
    task: str
    llm: str
    instruction: str
    n_items: int
    text: str
    created_at: datetime | None = None


@dataclass
class HistoryPair:
    """A training pair made from one history item: a task-format input and the user's own output.
    `recipe` names how the input was made (with its seed); `source_digest` is the item's content
    it was made from, so a changed item is never served a stale pair."""

    user_id: str
    task: str
    item_id: str
    recipe: str
    source_digest: str
    input: str
    output: str
    created_at: datetime | None = None


@dataclass
class Prediction:
    """One answer of one run: the normalized output that is scored, and the raw model text."""

    query_id: str
    user_id: str
    output: str
    raw: str
    gold: str | None = None


@dataclass
class Run:
    """One evaluation: what ran (config), how well (metrics) and how fast."""

    run_id: str
    task: str
    method: str
    split: str | None
    llm: str | None
    n_examples: int
    wall_s: float
    examples_per_s: float
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass
class Plugin:
    """A trained plug-in (task LoRA, one user's OPPU LoRA, …): its weights as safetensors bytes.

    `base` names the plug-in it was trained on top of (None: the bare LLM); `user_id` is set for
    per-user plug-ins; `config` says how it was made and `metrics` what training measured.
    """

    name: str
    kind: str
    llm: str
    weights: bytes
    task: str | None = None
    user_id: str | None = None
    encoder: str | None = None
    base: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    size: int = 0
    """Bytes of the stored weights (filled in by the store, also when the weights are not read)."""


@dataclass
class Piece:
    """One shared LoRA piece: the (A, B, gate) of one module of one sharer, as safetensors bytes.

    `registration` is the number N of the `pool-N` registration that wrote it; `config` says how
    it was trained and `metrics` what its sharer's training measured."""

    task: str
    sharer_id: str
    module: str
    r: int
    alpha: float
    llm: str
    tensors: bytes
    registration: int
    layer: int | None = None
    base: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    size: int = 0
    """Bytes of the stored tensors (filled in by the store, also when they are not read)."""


@dataclass
class PoolVersion:
    """One version of the pieces table that carries at least one tag."""

    version: int
    tags: list[str]
    created_at: datetime | None = None


@dataclass
class AssemblyRecord:
    """A target user's assembled adapter: per module the chosen sharers and weights, packed in
    `choice` (indices into the pool version's sharer list), against one pool version."""

    task: str
    user_id: str
    pool_version: int
    top_k: int
    llm: str
    choice: bytes
    base: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """How it was assembled (batch size, history items, precision): the same options give the same weights."""
    seconds: float | None = None
    created_at: datetime | None = None
