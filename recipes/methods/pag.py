"""PAG: a short profile of each user, written by the LLM from the history and cached in the store.

A cached profile is reused while it was made by the same model (the LLM with the same plug-ins
merged into it: `LLM.state_id`) with the same instruction from the same number of history items;
otherwise it is written again.
"""

from __future__ import annotations

from typing import Optional

from recipes import PersonaError
from recipes.kit.backbones import LLM
from recipes.kit.generation import generate
from recipes.kit.progress import Progress, report
from recipes.kit.prompts import PromptContext, TokenBudget, history_prompt
from recipes.kit.retrieval import recency_top
from recipes.kit.tasks import Task
from recipes.methods.registry import Method, register
from store import Behavior, Profile, Query, Store

PROFILE_MAX_NEW_TOKENS = 96


def profile_prompt(task: Task, task_input: str, profile: str) -> str:
    """The user's profile in front of the task input."""
    return f"About this user: {profile.strip()}\n\n{task_input}"


def profile_request(task: Task, history: list[Behavior], budget: TokenBudget) -> str:
    """What the LLM is asked to write a profile from: the instruction and the newest items that fit."""
    newest_first = [history[i] for i in recency_top(history, len(history))]
    return history_prompt(task, "", newest_first, budget, header=task.pag_instruction).rstrip()


def ensure_profiles(
    store: Store,
    llm: LLM,
    task: Task,
    histories: dict[str, list[Behavior]],
    batch_size: int = 8,
    max_input_tokens: int = 1024,
    progress: Optional[Progress] = None,
    pending: Optional[list[Profile]] = None,
) -> tuple[dict[str, str], int]:
    """Profile text per user of `histories`, and how many had to be written now. New profiles are
    stored at once, or with `pending` appended there for the caller to store with its own result
    (an evaluation that fails then leaves no profiles behind)."""
    cached = store.get_profiles(sorted(histories), task.name, llm.state_id)
    profiles = {
        uid: p.text
        for uid, p in cached.items()
        if p.instruction == task.pag_instruction and p.n_items == len(histories[uid])
    }
    missing = sorted(uid for uid in histories if uid not in profiles)
    if not missing:
        return profiles, 0
    budget = TokenBudget(llm.tokenizer, max_input_tokens)
    requests = [profile_request(task, histories[uid], budget) for uid in missing]
    written = generate(llm, requests, PROFILE_MAX_NEW_TOKENS, batch_size, max_input_tokens, progress, stage="writing profiles")
    new = [
        Profile(uid, task.name, llm.state_id, task.pag_instruction, len(histories[uid]), text)
        for uid, text in zip(missing, written)
    ]
    if pending is None:
        store.put_profiles(new)
    else:
        pending.extend(new)
    profiles.update({p.user_id: p.text for p in new})
    return profiles, len(new)


def profile_prompts(ctx: PromptContext, queries: list[Query]) -> tuple[list[str], dict]:
    histories = ctx.histories(queries)
    profiles, written = ensure_profiles(
        ctx.store, ctx.llm, ctx.task, histories, ctx.batch_size, ctx.max_input_tokens, ctx.progress, ctx.pending_profiles
    )
    tick = report(ctx.progress)
    prompts = []
    for n, query in enumerate(queries):
        if query.user_id not in profiles:
            raise PersonaError(f"no profile of user '{query.user_id}' for PAG")
        prompts.append(profile_prompt(ctx.task, query.input, profiles[query.user_id]))
        tick("building prompts", n + 1, len(queries))
    return prompts, {"profiles_written": written}


PAG = register(Method(
    name="pag", summary="a profile of the user the LLM writes from the history (cached per model) before the input",
    prompts=profile_prompts,
))  # fmt: skip
