"""Ingest users into the store: validate the whole input, then embed in batches and write once.

Two passes over the file keep memory bounded: the first validates everything and keeps only ids,
queries and user fields; the second streams history items through the encoder into the store.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from recipes.kit.backbones import Encoder
from recipes.kit.engine import LOCAL, Engine, fan_out
from recipes.kit.inputs import UserInput, read_lamp_outputs, read_lamp_questions, read_users_jsonl
from recipes.kit.progress import Progress, report
from recipes.kit.tasks import Task
from store import Behavior, BehaviorBatch, Query, Store

EMBED_CHUNK = 4096
"""Texts handed to the encoder at once: large enough for its length sorting to pay off."""


def users_jsonl_source(path: str | Path, task: Task, split: str | None = None) -> Callable[[], Iterator[UserInput]]:
    """A re-readable stream of users from users.jsonl."""
    return lambda: read_users_jsonl(path, task, split)


def lamp_source(
    questions: str | Path, task: Task, outputs: str | Path | None = None, split: str | None = None
) -> Callable[[], Iterator[UserInput]]:
    """A re-readable stream of users from LaMP questions.json (+ outputs.json golds)."""
    golds = read_lamp_outputs(outputs, task) if outputs is not None else None
    return lambda: read_lamp_questions(questions, task, golds, split)


def ingest(
    store: Store,
    source: Callable[[], Iterator[UserInput]],
    encoder: Encoder | Callable[[], Encoder],
    batch_size: int = 64,
    progress: Optional[Progress] = None,
    engine: Engine = LOCAL,
) -> dict[str, Any]:
    """Validate all of `source`, then embed and upsert it; on any error the store is unchanged.

    `encoder` may be a loader, called only once the input has proved valid; with a Ray `engine`
    each worker calls it (so it must pickle) and embeds chunks of texts, this process writes.
    """
    tick = report(progress)
    started = time.perf_counter()
    queries: list[Query] = []
    metadata: dict[str, dict] = {}
    occurrences: Counter[str] = Counter()
    n_items = 0
    for user in source():  # pass 1: validation only
        occurrences[user.user_id] += 1
        metadata.setdefault(user.user_id, {}).update(user.metadata)
        queries.extend(user.queries)
        n_items += len(user.items)
        tick("validating", n_items, 0)
    load = None if isinstance(encoder, Encoder) else encoder
    encoder = encoder if isinstance(encoder, Encoder) else encoder()
    store.check_encoder(encoder.id, encoder.dim)
    repeated = {uid for uid, count in occurrences.items() if count > 1}
    if engine.is_local or load is None:
        make_embedder = lambda: _embedder(encoder, batch_size)  # noqa: E731
    else:  # each Ray worker loads its own encoder
        make_embedder = lambda: _embedder(load(), batch_size)  # noqa: E731

    def embedded_batches() -> Iterator[BehaviorBatch]:
        done = 0
        tick("embedding", 0, n_items)
        chunks, texts = _tee_texts(_chunks(_unique_items(source(), repeated, encoder.id), EMBED_CHUNK))
        for vectors, chunk in zip(fan_out(engine, make_embedder, texts, window=RAY_WINDOW), chunks):
            done += len(chunk)
            tick("embedding", done, n_items)
            yield BehaviorBatch.of(chunk, np.asarray(vectors))

    counts = store.ingest(embedded_batches(), queries, metadata, encoder.id, encoder.dim)
    seconds = time.perf_counter() - started
    return {**counts, "encoder": encoder.id, **engine.describe(), "seconds": round(seconds, 3), "items_per_s": round(counts["items"] / seconds, 1) if seconds else 0.0}


RAY_WINDOW = 16
"""Chunks of texts a Ray engine has in flight at once (its encoders load once per window)."""


def _embedder(encoder: Encoder, batch_size: int) -> Callable[[list[str]], Any]:
    return lambda texts: encoder.encode(texts, batch_size=batch_size)


def _tee_texts(chunks: Iterator[list[Behavior]]) -> tuple[Iterator[list[Behavior]], Iterator[list[str]]]:
    """The chunks, and their texts as a second stream the engine reads ahead of the first: the
    chunks it has taken wait in a queue until their vectors come back."""
    from collections import deque

    waiting: deque[list[Behavior]] = deque()

    def texts() -> Iterator[list[str]]:
        for chunk in chunks:
            waiting.append(chunk)
            yield [b.text for b in chunk]

    def taken() -> Iterator[list[Behavior]]:
        while True:
            yield waiting.popleft()

    return taken(), texts()


def _unique_items(users: Iterable[UserInput], repeated: set[str], encoder_id: str) -> Iterator[Behavior]:
    """Flatten users to behaviours; a user named by several LaMP questions keeps each item once."""
    seen: set[tuple[str, str]] = set()
    for user in users:
        for item in user.items:
            if user.user_id in repeated:
                key = (user.user_id, item.item_id)
                if key in seen:
                    continue
                seen.add(key)
            yield Behavior(
                item_id=item.item_id,
                user_id=user.user_id,
                task=user.task,
                text=item.text,
                fields=item.fields,
                timestamp=item.timestamp,
                encoder=encoder_id,
            )


def _chunks(items: Iterable[Behavior], size: int) -> Iterator[list[Behavior]]:
    chunk: list[Behavior] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
