"""What prompt methods build prompts with: the settings they share, the context they read the
store and the LLM through, and history items rendered under a token budget.

Items go into the prompt most relevant first under the budget, so a prompt never outgrows the
LLM's input limit however long the history is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Optional

from recipes import PersonaError
from recipes.kit.backbones import LLM, Encoder
from recipes.kit.progress import Progress
from recipes.kit.retrieval import RETRIEVERS, donors
from recipes.kit.tasks import Task
from store import Behavior, Profile, Query, Store

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
    """How a prompt method picks history items: `k` items by `retriever` (rag: only those with cosine
    >= `min_similarity` to the query, when set), or at random by `seed`; with `ablation`, from
    another user's history (a seeded derangement of the users served: `served`, every user of the
    command when it is answered in parts, else the queries' users)."""

    k: int = 1
    retriever: str = "bm25"
    seed: int = 0
    ablation: bool = False
    served: tuple[str, ...] = ()
    min_similarity: Optional[float] = None

    def validate(self) -> None:
        if self.retriever not in RETRIEVERS:
            raise PersonaError(f"--retriever {self.retriever}: expected one of {', '.join(RETRIEVERS)}")
        if self.k < 1:
            raise PersonaError(f"--k must be at least 1, got {self.k}")
        check_min_similarity(self.min_similarity, "--min-similarity")


def check_min_similarity(value: Optional[float], flag: str) -> None:
    """A cosine threshold lies in [-1, 1] (None: no threshold)."""
    if value is not None and not -1.0 <= value <= 1.0:
        raise PersonaError(f"{flag} is a cosine similarity in [-1, 1], got {value}")


@dataclass
class PromptContext:
    """What a prompt method may read to build a batch's prompts: the store, the loaded LLM (PAG
    writes profiles with it), the encoder on demand (dense retrieval), and where to leave new
    profiles so a failed evaluation stores nothing."""

    store: Store
    llm: LLM
    task: Task
    settings: PromptSettings
    load_encoder: Optional[Callable[[], Encoder]] = None
    batch_size: int = 16
    max_input_tokens: int = 1024
    progress: Optional[Progress] = None
    pending_profiles: Optional[list[Profile]] = None

    @cached_property
    def budget(self) -> TokenBudget:
        return TokenBudget(self.llm.tokenizer, self.max_input_tokens)

    def histories(self, queries: list[Query], with_vectors: bool = False) -> dict[str, list[Behavior]]:
        """The queries' users' histories of this task, oldest first."""
        return self.store.histories([q.user_id for q in queries], self.task.name, with_vectors=with_vectors)

    def donated_histories(self, queries: list[Query], method: str, with_vectors: bool = False) -> dict[str, list[Behavior]]:
        """For an ablation: each query's user mapped to their donor's history (see `donors`)."""
        users = sorted({q.user_id for q in queries})
        donor = donors(users, self.settings.seed, method, self.settings.served)
        donated = self.store.histories(sorted({donor[u] for u in users}), self.task.name, with_vectors=with_vectors)
        return {user: donated.get(donor[user], []) for user in users}

    def encoder(self) -> Encoder:
        """The store's encoder (checked against the stored vectors)."""
        if self.load_encoder is None:
            raise PersonaError("dense retrieval needs the store's encoder")
        encoder = self.load_encoder()
        self.store.check_encoder(encoder.id, encoder.dim)
        return encoder


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
