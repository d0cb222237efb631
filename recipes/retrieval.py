"""Finding items of one user's history: dense vector search over the stored vectors."""

from __future__ import annotations

from recipes import PersonaError
from recipes.backbones import Encoder
from store import SearchHit, Store


def dense_search(store: Store, encoder: Encoder, user_id: str, text: str, k: int = 5, task: str | None = None) -> list[SearchHit]:
    """The k items of `user_id`'s history nearest to `text` by cosine (store-side vector search)."""
    if store.get_user(user_id) is None:
        raise PersonaError(f"no user '{user_id}' in store {store.uri}")
    store.check_encoder(encoder.id, encoder.dim)
    if k < 1:
        raise PersonaError(f"--k must be at least 1, got {k}")
    vector = encoder.encode([text])[0]
    return store.search_history(user_id, vector, k=k, task=task)
