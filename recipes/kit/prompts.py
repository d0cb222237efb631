"""Prompts of the non-trained methods: k=0, random history, RAG (BM25, recency, dense) and PAG.

Retrieved items go into the prompt under a token budget, most relevant first, so a prompt
never outgrows the LLM's input limit however long the history is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from recipes import PersonaError
from recipes.kit.progress import Progress, report
from recipes.kit.retrieval import RETRIEVERS, bm25_top, dense_top, random_items, recency_top
from recipes.kit.tasks import Task
from store import Behavior, Query

PROMPT_METHODS = ("none", "random", "rag", "pag")
MIN_ITEM_TOKENS = 16
"""A retrieved item cut shorter than this to fit the budget is left out instead."""


class TokenBudget:
    """Counts and cuts text in the LLM's own tokens, leaving room for the chat template."""

    def __init__(self, tokenizer: Any, max_input_tokens: int, reserve: int = 24) -> None:
        self.tokenizer = tokenizer
        self.limit = max_input_tokens - reserve
        if self.limit < 32:
            raise PersonaError(f"--max-input-tokens {max_input_tokens} is too small for a prompt")

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def cut(self, text: str, tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= tokens else self.tokenizer.decode(ids[:tokens]).rstrip() + "…"


@dataclass(frozen=True)
class PromptSettings:
    """How a prompt method picks history items: `k` items by `retriever` (rag) or at random."""

    method: str = "none"
    k: int = 1
    retriever: str = "bm25"
    seed: int = 0

    def validate(self) -> None:
        if self.method not in PROMPT_METHODS:
            raise PersonaError(f"--method {self.method}: expected one of {', '.join(PROMPT_METHODS)}")
        if self.retriever not in RETRIEVERS:
            raise PersonaError(f"--retriever {self.retriever}: expected one of {', '.join(RETRIEVERS)}")
        if self.k < 1:
            raise PersonaError(f"--k must be at least 1, got {self.k}")

    @property
    def needs_vectors(self) -> bool:
        return self.method == "rag" and self.retriever == "dense"


def history_prompt(task: Task, task_input: str, items: list[Behavior], budget: TokenBudget, header: str | None = None) -> str:
    """The task input after as many of `items` (in the given order) as the budget allows."""
    lines: list[str] = []
    head = header or task.rag_header
    used = budget.count(head) + budget.count(task_input) + 4
    for item in items:
        line = task.render_item(item.fields, item.text)
        cost = budget.count(line) + 1
        if used + cost > budget.limit:
            room = budget.limit - used - 1
            if room >= MIN_ITEM_TOKENS:
                lines.append(budget.cut(line, room))
            break
        lines.append(line)
        used += cost
    if not lines:
        return task_input
    return head + "\n" + "\n".join(lines) + "\n\n" + task_input


def profile_prompt(task: Task, task_input: str, profile: str) -> str:
    """PAG: the user's profile in front of the task input."""
    return f"About this user: {profile.strip()}\n\n{task_input}"


def profile_request(task: Task, history: list[Behavior], budget: TokenBudget) -> str:
    """What the LLM is asked to write a PAG profile from: the instruction and the newest items that fit."""
    newest_first = [history[i] for i in recency_top(history, len(history))]
    return history_prompt(task, "", newest_first, budget, header=task.pag_instruction).rstrip()


def choose_items(
    settings: PromptSettings,
    task: Task,
    query: Query,
    history: list[Behavior],
    query_vector: Optional[np.ndarray] = None,
) -> list[Behavior]:
    """The history items a prompt method shows for one query, best first."""
    if settings.method == "random":
        positions = random_items(len(history), settings.k, settings.seed, f"{query.task}/{query.query_id}")
    elif settings.retriever == "bm25":
        positions = bm25_top([item.text for item in history], task.query_text(query.input), settings.k)
    elif settings.retriever == "recency":
        positions = recency_top(history, settings.k)
    else:
        if query_vector is None:
            raise PersonaError("dense retrieval needs the query's vector")
        positions = dense_top(history, query_vector, settings.k)
    return [history[i] for i in positions]


def build_prompts(
    settings: PromptSettings,
    task: Task,
    queries: list[Query],
    histories: dict[str, list[Behavior]],
    budget: TokenBudget,
    query_vectors: Optional[np.ndarray] = None,
    profiles: Optional[dict[str, str]] = None,
    progress: Optional[Progress] = None,
) -> list[str]:
    """One prompt per query for the method in `settings` (rows of query_vectors follow `queries`)."""
    settings.validate()
    tick = report(progress)
    prompts = []
    for n, query in enumerate(queries):
        history = histories.get(query.user_id, [])
        if settings.method == "none":
            prompt = query.input
        elif settings.method == "pag":
            if not profiles or query.user_id not in profiles:
                raise PersonaError(f"no profile of user '{query.user_id}' for PAG")
            prompt = profile_prompt(task, query.input, profiles[query.user_id])
        else:
            vector = query_vectors[n] if query_vectors is not None else None
            prompt = history_prompt(task, query.input, choose_items(settings, task, query, history, vector), budget)
        prompts.append(prompt)
        tick("building prompts", n + 1, len(queries))
    return prompts
