"""PAG: a short profile of each user, written by the LLM from the history and cached in the store.

A cached profile is reused while it was made by the same model (the LLM with the same plug-ins
merged into it: `LLM.state_id`) with the same instruction from the same number of history items;
otherwise it is written again.
"""

from __future__ import annotations

from typing import Optional

from recipes.kit.backbones import LLM
from recipes.kit.generation import generate
from recipes.kit.progress import Progress
from recipes.kit.prompts import TokenBudget, profile_request
from recipes.kit.tasks import Task
from store import Behavior, Profile, Store

PROFILE_MAX_NEW_TOKENS = 96


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
