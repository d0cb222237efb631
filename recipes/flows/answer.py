"""Prompts and answers of the prompt methods: shared by evaluation runs and `persona generate`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from recipes import PersonaError
from recipes.kit.backbones import LLM, Encoder
from recipes.kit.decoding import Decoding
from recipes.kit.generation import generate, label_logprobs
from recipes.methods.pag import ensure_profiles
from recipes.kit.progress import Progress
from recipes.kit.prompts import PromptSettings, TokenBudget, build_prompts
from recipes.kit.row_lora import RowLora
from recipes.kit.soft_prompts import SoftTokens
from recipes.flows.serve import plan_serving, split_method
from recipes.kit.tasks import Task, get_task
from store import Profile, Query, Store


@dataclass
class Answer:
    user_id: str
    task: str
    method: str
    llm: str
    prompt: str
    raw: str
    output: str


def prompt_method(method: str) -> str:
    """The prompt a method's LLM sees: adapter methods answer the k=0 prompt, 'perpcs+rag' the RAG prompt."""
    return split_method(method)[1]


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
    settings: PromptSettings,
    queries: list[Query],
    load_encoder: Optional[Callable[[], Encoder]] = None,
    batch_size: int = 16,
    max_input_tokens: int = 1024,
    progress: Optional[Progress] = None,
    pending_profiles: Optional[list[Profile]] = None,
) -> tuple[list[str], dict]:
    """One prompt per query for the method in `settings`, reading what it needs from the store
    (histories, PAG profiles, the query vectors for dense retrieval); also facts for a run's config.
    New PAG profiles are stored, or appended to `pending_profiles` for the caller to store."""
    facts: dict = {}
    histories = store.histories([q.user_id for q in queries], task.name, with_vectors=settings.needs_vectors)
    profiles, vectors = None, None
    if settings.method == "pag":
        profiles, facts["profiles_written"] = ensure_profiles(
            store, llm, task, histories, batch_size, max_input_tokens, progress, pending_profiles
        )
    if settings.needs_vectors:
        if load_encoder is None:
            raise PersonaError("dense retrieval needs the store's encoder")
        encoder = load_encoder()
        store.check_encoder(encoder.id, encoder.dim)
        vectors = encoder.encode([task.query_text(q.input) for q in queries])
        facts["encoder"] = encoder.id
    budget = TokenBudget(llm.tokenizer, max_input_tokens)
    return build_prompts(settings, task, queries, histories, budget, vectors, profiles, progress), facts


def answer_prompts(
    llm: LLM,
    task: Task,
    mode: str,
    prompts: list[str],
    batch_size: int = 16,
    max_new_tokens: Optional[int] = None,
    max_input_tokens: int = 1024,
    progress: Optional[Progress] = None,
    lora: Optional[RowLora] = None,
    soft: Optional[SoftTokens] = None,
    decoding: Optional[Decoding] = None,
    inputs: Optional[list[str]] = None,
) -> list[str]:
    """Raw answers: the most likely label ('rank'), or the LLM's text ('generate') decoded as
    `decoding` says (default: the task's); `inputs` (the queries' own inputs) tie each answer's
    length to its input's when the decoding has a length ratio. With `lora`, prompt i goes
    through its own user's adapter; with `soft`, it opens with its own soft tokens."""
    if mode == "rank":
        scores = label_logprobs(llm, prompts, task.rank_answers(), batch_size, max_input_tokens, progress, lora, soft)
        return [task.labels[int(i)] for i in scores.argmax(dim=1)]
    decoding = decoding or task.decoding
    limit = max_new_tokens or task.max_new_tokens
    limits = None
    if decoding.length_ratio is not None and inputs is not None:
        sizes = [len(llm.tokenizer(task.query_text(text), add_special_tokens=False)["input_ids"]) for text in inputs]
        limits = [decoding.new_token_limit(limit, size) for size in sizes]
    return generate(
        llm, prompts, limit, batch_size, max_input_tokens, progress, lora=lora, soft=soft, decoding=decoding, limits=limits
    )


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
    method: Optional[str] = None,
    plugin: Optional[str] = None,
    base: Optional[str] = None,
    pool: Optional[str] = None,
    top_k: Optional[int] = None,
    decoding: Optional[Decoding] = None,
) -> Answer:
    """Build this user's prompt for `text` with `method` (default: the prompt method of
    `settings`) and answer it ('generate', or 'rank' over the task's labels), through the
    method's plug-ins: a task LoRA, the user's OPPU or assembled adapter, PPlug's soft tokens, or a
    prompt method on `base`."""
    method = method or settings.method
    settings.validate()
    if not text.strip():
        raise PersonaError("the input text is empty")
    plan = plan_serving(store, task, method, [user_id], plugin, base, pool, top_k)
    llm = load_llm()
    lora = plan.apply(llm)
    query = Query(query_id="input", user_id=user_id, task=task.name, input=text)
    [prompt], _ = method_prompts(store, llm, task, settings, [query], load_encoder, 1, max_input_tokens)
    soft = plan.soft_tokens(llm, [query])
    [raw] = answer_prompts(
        llm, task, mode, [prompt], 1, max_new_tokens, max_input_tokens, lora=lora, soft=soft, decoding=decoding, inputs=[text]
    )
    return Answer(user_id, task.name, method, llm.id, prompt, raw, task.normalize(raw))
