"""History in the prompt: RAG (the k items most relevant to the query, by BM25, recency or dense
vectors, optionally only those at least --min-similarity alike to it) and its control, k items at random (seeded per query). The ablation of either chooses the
same way from another user's history, so a gain over it is the user's own items at work."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from recipes.kit.progress import report
from recipes.kit.prompts import PromptContext, PromptSettings, history_prompt
from recipes.kit.retrieval import bm25_items, dense_top, input_vectors, random_items, recency_top, similar_items
from recipes.methods.registry import Method, PromptBuilder, register
from store import Behavior, Query


ABLATION = "another user's history (seeded derangement), chosen the same way"


def retrieved_items(ctx: PromptContext, query: Query, history: list[Behavior], query_vector: Optional[np.ndarray] = None) -> list[Behavior]:
    """The k items of `history` the retriever ranks highest for this query, best first (with
    --min-similarity, those of them alike enough to the query)."""
    settings = ctx.settings
    if settings.retriever == "bm25":
        items = bm25_items(ctx.task, query.input, history, settings.k)
    elif settings.retriever == "recency":
        items = [history[i] for i in recency_top(history, settings.k)]
    else:
        items = [history[i] for i in dense_top(history, query_vector, settings.k)]
    if settings.min_similarity is not None:
        items = similar_items(items, query_vector, settings.min_similarity)
    return items


def random_choice(ctx: PromptContext, query: Query, history: list[Behavior], _: Optional[np.ndarray] = None) -> list[Behavior]:
    positions = random_items(len(history), ctx.settings.k, ctx.settings.seed, f"{query.task}/{query.query_id}")
    return [history[i] for i in positions]


def _history_prompts(choose: Callable, by_retriever: bool, method: str) -> PromptBuilder:
    """Prompts of `choose`'s items; `by_retriever`: it follows --retriever and --min-similarity (dense
    retrieval and the similarity threshold read the query vectors). The ablation chooses the same
    way from another user's history."""

    def build(ctx: PromptContext, queries: list[Query]) -> tuple[list[str], dict]:
        by_vector = by_retriever and (ctx.settings.retriever == "dense" or ctx.settings.min_similarity is not None)
        facts, vectors = {}, None
        if ctx.settings.ablation:
            histories = ctx.donated_histories(queries, method, with_vectors=by_vector)
            facts["ablation"] = ABLATION
        else:
            histories = ctx.histories(queries, with_vectors=by_vector)
        if by_vector:
            encoder = ctx.encoder()
            vectors = input_vectors(encoder, ctx.task, [q.input for q in queries])
            facts["encoder"] = encoder.id
        tick = report(ctx.progress)
        prompts = []
        for n, query in enumerate(queries):
            items = choose(ctx, query, histories.get(query.user_id, []), None if vectors is None else vectors[n])
            prompts.append(history_prompt(ctx.task, query.input, items, ctx.budget))
            tick("building prompts", n + 1, len(queries))
        return prompts, facts

    return build


def _rag_label(prompt: PromptSettings) -> str:
    """'rag-bm25-k2', or 'rag-bm25-k2-sim0.4' with a similarity threshold."""
    threshold = f"-sim{prompt.min_similarity:g}" if prompt.min_similarity is not None else ""
    return f"rag-{prompt.retriever}-k{prompt.k}{threshold}"


RANDOM = register(Method(
    name="random", summary="k history items at random (seeded per query; --k, --seed)",
    prompts=_history_prompts(random_choice, by_retriever=False, method="random"), label=lambda options, prompt: f"random-k{prompt.k}",
    ablation=ABLATION, donor_ablation=True,
))  # fmt: skip
RAG = register(Method(
    name="rag", summary="the k history items most relevant to the query (--retriever bm25, recency or dense; --k; --min-similarity)",
    prompts=_history_prompts(retrieved_items, by_retriever=True, method="rag"), label=lambda options, prompt: _rag_label(prompt),
    ablation=ABLATION, donor_ablation=True,
))  # fmt: skip
