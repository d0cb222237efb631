"""Answering one new input for one user with a prompt method: what `persona generate` runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from recipes import PersonaError
from recipes.backbones import LLM, Encoder
from recipes.generation import generate, label_logprobs
from recipes.profiles import ensure_profiles
from recipes.prompting import PromptSettings, TokenBudget, build_prompts
from recipes.tasks import Task, get_task
from store import Query, Store


@dataclass
class Answer:
    user_id: str
    task: str
    method: str
    llm: str
    prompt: str
    raw: str
    output: str


def user_task(store: Store, user_id: str, task: Optional[str]) -> Task:
    """The task named, or the only task the user's history belongs to."""
    if store.get_user(user_id) is None:
        raise PersonaError(f"no user '{user_id}' in store {store.uri}")
    if task:
        return get_task(task)
    tasks = sorted({item.task for item in store.user_history(user_id)})
    if len(tasks) != 1:
        raise PersonaError(f"user '{user_id}' has history in tasks {', '.join(tasks) or '(none)'}; pass --task")
    return get_task(tasks[0])


def answer(
    store: Store,
    user_id: str,
    text: str,
    task: Task,
    settings: PromptSettings,
    mode: str,
    load_llm: Callable[[], LLM],
    load_encoder: Optional[Callable[[], Encoder]] = None,
    max_new_tokens: Optional[int] = None,
    max_input_tokens: int = 1024,
) -> Answer:
    """Build this user's prompt for `text` with the method in `settings` and answer it
    ('generate', or 'rank' over the task's labels)."""
    settings.validate()
    if not text.strip():
        raise PersonaError("the input text is empty")
    llm = load_llm()
    query = Query(query_id="input", user_id=user_id, task=task.name, input=text)
    histories = store.histories([user_id], task.name, with_vectors=settings.needs_vectors)
    profiles = ensure_profiles(store, llm, task, histories, max_input_tokens=max_input_tokens)[0] if settings.method == "pag" else None
    vectors = None
    if settings.needs_vectors:
        encoder = load_encoder()
        store.check_encoder(encoder.id, encoder.dim)
        vectors = encoder.encode([task.query_text(text)])
    budget = TokenBudget(llm.tokenizer, max_input_tokens)
    [prompt] = build_prompts(settings, task, [query], histories, budget, vectors, profiles)
    if mode == "rank":
        raw = task.labels[int(label_logprobs(llm, [prompt], task.rank_answers(), 1, max_input_tokens).argmax())]
    else:
        raw = generate(llm, [prompt], max_new_tokens or task.max_new_tokens, 1, max_input_tokens)[0]
    return Answer(user_id, task.name, settings.method, llm.id, prompt, raw, task.normalize(raw))
