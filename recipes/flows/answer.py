"""Answering: a method's prompts for a batch of queries, answered through its serving plan. Shared
by evaluation runs and `persona generate`, which answers one input for one user the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from recipes import PersonaError
from recipes.flows.serve import MethodRequest, plan_serving
from recipes.kit.backbones import LLM, Encoder
from recipes.kit.decoding import Decoding
from recipes.kit.generation import generate, label_logprobs
from recipes.kit.progress import Progress
from recipes.kit.prompts import PromptContext
from recipes.kit.retrieval import donors
from recipes.kit.row_edits import NOTHING, PerRow
from recipes.kit.tasks import Task, get_task
from recipes.methods.history_reuse import reused_answers
from recipes.methods.user_spellings import check_spellings, respelled_answers
from store import Behavior, Profile, Query, Store


@dataclass
class Answer:
    user_id: str
    task: str
    method: str
    llm: str
    prompt: str
    raw: str
    output: str
    reused: bool = False
    """Answered with the user's own earlier answer (--reuse-history), not by the LLM."""
    respelled: bool = False
    """Words of the LLM's answer spelled the user's way (--user-spellings)."""


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


def method_prompts(
    store: Store,
    llm: LLM,
    task: Task,
    request: MethodRequest,
    queries: list[Query],
    load_encoder: Optional[Callable[[], Encoder]] = None,
    batch_size: int = 16,
    max_input_tokens: int = 1024,
    progress: Optional[Progress] = None,
    pending_profiles: Optional[list[Profile]] = None,
) -> tuple[list[str], dict]:
    """One prompt per query by the request's prompt method, and facts for a run's config. New PAG
    profiles are stored, or appended to `pending_profiles` for the caller to store."""
    _, prompt = request.methods()
    context = PromptContext(
        store, llm, task, request.prompt_settings(), load_encoder, batch_size, max_input_tokens, progress, pending_profiles
    )
    return prompt.prompts(context, queries)


def stage_histories(
    store: Store, task: Task, request: MethodRequest, user_ids: list[str], *stages: Optional[float]
) -> dict[str, list[Behavior]]:
    """The history each user's answers may draw on in the history stages (--reuse-history,
    --user-spellings), read once for all of them: their own, or with --ablation their donor's
    (the derangement every ablation of the method uses). Nothing is read when no stage is on."""
    if all(stage is None for stage in stages):
        return {}
    users = sorted(set(user_ids))
    model, prompt = request.methods()
    owner = donors(users, request.seed, (model or prompt).name, request.served) if request.ablation else {u: u for u in users}
    read = store.histories(sorted(set(owner.values())), task.name)
    return {u: read.get(owner[u], []) for u in users}


def reuse(task: Task, queries: list[Query], histories: dict[str, list[Behavior]], min_overlap: Optional[float]) -> list[Optional[str]]:
    """Per query, its user's earlier answer to reuse from `histories` (stage_histories; see
    recipes.methods.history_reuse), or None for the method to answer. All None when `min_overlap` is None."""
    if min_overlap is None:
        return [None] * len(queries)
    return reused_answers(task, queries, histories, min_overlap)


def respell(
    task: Task, queries: list[Query], answers: list[str], histories: dict[str, list[Behavior]], min_count: Optional[int]
) -> tuple[list[str], int]:
    """The LLM's answers with words spelled as each user's history in `histories` spells them
    (stage_histories; see recipes.methods.user_spellings), and how many changed. Unchanged when
    `min_count` is None."""
    if min_count is None:
        return answers, 0
    return respelled_answers(task, answers, [q.user_id for q in queries], histories, min_count)


def answer_prompts(
    llm: LLM,
    task: Task,
    mode: str,
    prompts: list[str],
    batch_size: int = 16,
    max_new_tokens: Optional[int] = None,
    max_input_tokens: int = 1024,
    progress: Optional[Progress] = None,
    per_row: PerRow = NOTHING,
    decoding: Optional[Decoding] = None,
    inputs: Optional[list[str]] = None,
) -> list[str]:
    """Raw answers: the most likely label ('rank'), or the LLM's text ('generate') decoded as
    `decoding` says (default: the task's); `inputs` (the queries' own inputs) tie each answer's
    length to its input's when the decoding has a length ratio. `per_row` gives prompt i its own
    user's edit and soft tokens."""
    if mode == "rank":
        scores = label_logprobs(llm, prompts, task.rank_answers(), batch_size, max_input_tokens, progress, per_row)
        return [task.labels[int(i)] for i in scores.argmax(dim=1)]
    decoding = decoding or task.decoding
    limit = max_new_tokens or task.max_new_tokens
    limits = None
    if decoding.length_ratio is not None and inputs is not None:
        sizes = [len(llm.tokenizer(task.query_text(text), add_special_tokens=False)["input_ids"]) for text in inputs]
        limits = [decoding.new_token_limit(limit, size) for size in sizes]
    return generate(llm, prompts, limit, batch_size, max_input_tokens, progress, per_row=per_row, decoding=decoding, limits=limits)


@dataclass
class AnswerSettings:
    """How one answer is made: 'generate' or 'rank', the decoding, the token limits."""

    mode: str = "generate"
    decoding: Optional[Decoding] = None
    max_new_tokens: Optional[int] = None
    max_input_tokens: int = 1024
    reuse_min_overlap: Optional[float] = None
    spelling_min_count: Optional[int] = None


def answer(
    store: Store,
    user_id: str,
    text: str,
    task: Task,
    request: MethodRequest,
    how: AnswerSettings,
    load_llm: Callable[[], LLM],
    load_encoder: Optional[Callable[[], Encoder]] = None,
) -> Answer:
    """This user's prompt for `text` by the request's method, answered through the method's plan:
    a task LoRA, the user's own or assembled adapter, soft tokens, a steering vector, or a prompt
    method on a `base`. With `how.reuse_min_overlap`, an input that nearly repeats one of the
    user's history items is answered with that item's answer, and no model loads; with
    `how.spelling_min_count` the LLM's answer is spelled the user's way."""
    if not text.strip():
        raise PersonaError("the input text is empty")
    check_spellings(task, how.spelling_min_count)
    plan = plan_serving(store, task, request, [user_id])
    query = Query(query_id="input", user_id=user_id, task=task.name, input=text)
    histories = stage_histories(store, task, request, [user_id], how.reuse_min_overlap, how.spelling_min_count)
    [reused] = reuse(task, [query], histories, how.reuse_min_overlap)
    if reused is not None:
        return Answer(user_id, task.name, request.method, "", "", reused, task.normalize(reused), reused=True)
    llm = load_llm()
    per_row = plan.prepare(llm, [query])
    [prompt], _ = method_prompts(store, llm, task, request, [query], load_encoder, 1, how.max_input_tokens)
    [raw] = answer_prompts(
        llm, task, how.mode, [prompt], 1, how.max_new_tokens, how.max_input_tokens, per_row=per_row, decoding=how.decoding, inputs=[text]
    )
    [raw], respelled = respell(task, [query], [raw], histories, how.spelling_min_count)
    return Answer(user_id, task.name, request.method, llm.id, prompt, raw, task.normalize(raw), respelled=respelled > 0)
