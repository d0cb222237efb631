"""The task LoRA (task adaptation): one LoRA for everyone, trained on the training-split users'
queries and chosen on the dev users'; the base OPPU adapters and the sharers' pieces sit on.
"""

from __future__ import annotations

from typing import Callable, Optional

from recipes import PersonaError
from recipes.flows.answer import answer_prompts
from recipes.kit.backbones import LLM, Encoder, loaded
from recipes.kit.plugins import apply_chain, base_chain, lora_plugin_config, training_metrics
from recipes.kit.serving_plan import ServingPlan
from recipes.kit.training_loop import Example, LoraSettings, train_lora
from recipes.kit.progress import Progress
from recipes.kit.tasks import Task
from recipes.kit.history_pairs import check_recipe
from recipes.kit.prompts import TokenBudget, check_min_similarity
from recipes.kit.training_data import Retrieval, checkpoint_path, query_examples, split_queries, train_user_pairs
from recipes.methods.registry import Method, MethodOptions, register
from store import Plugin, Store

TASK_LORA = "task-lora"


def task_lora_name(task: Task) -> str:
    """The default name of a task's adapted base."""
    return f"{TASK_LORA}-{task.name}"


# ---------- task adaptation ----------

SELECTIONS = ("loss", "metric")


def _dev_scorer(llm: LLM, task: Task, dev: list[Example], batch_size: int) -> Callable[[], float]:
    """The task's first metric of the LLM as it is now on the dev examples (sign flipped where lower is better)."""
    metric = task.metric_names[0]
    sign = 1.0 if task.higher_is_better(metric) else -1.0

    def score() -> float:
        mode = "rank" if task.is_classification else "generate"
        raw = answer_prompts(llm, task, mode, [e.prompt for e in dev], max(batch_size, 16))
        return sign * task.score([task.normalize(r) for r in raw], [e.target for e in dev])[metric]

    return score


def adapt_task(
    store: Store,
    llm: LLM | Callable[[], LLM],
    task: Task,
    settings: LoraSettings,
    name: str,
    base: Optional[str] = None,
    replace: bool = False,
    max_examples: Optional[int] = None,
    progress: Optional[Progress] = None,
    select: str = "loss",
    pairs: str = "none",
    rag_k: int = 0,
    max_input_tokens: int = 1024,
    rag_min_similarity: Optional[float] = None,
    encoder: Optional[Callable[[], Encoder]] = None,
) -> Plugin:
    """Train the task LoRA on the training-split users' queries, keep the step that does best on
    the dev-split queries (select 'loss': the lowest dev loss; 'metric': the task's first metric,
    e.g. ROUGE-1, which generates every dev answer at every evaluation), and store it as plug-in
    `name`. With `pairs` (history_pairs) the training users' history items made into task-format
    pairs train too (never one whose output is a held-out query's gold). With `rag_k` every prompt
    (train and dev) shows the user's k BM25-retrieved history items as `rag` serves them, so the
    adapter learns to read a user's earlier examples; serve it with `--method rag --k K --base NAME`
    (with `rag_min_similarity`, only items that alike to the input by `encoder`, the store's, are
    shown, and `--min-similarity` serves the same). Test users are never trained on."""
    settings.validate()
    check_recipe(pairs)
    if rag_k < 0:
        raise PersonaError(f"--rag-k must be 0 (no retrieval) or more, got {rag_k}")
    check_min_similarity(rag_min_similarity, "--rag-min-similarity")
    if rag_min_similarity is not None and not rag_k:
        raise PersonaError("--rag-min-similarity goes with --rag-k K (it filters the retrieved items)")
    if rag_min_similarity is not None and encoder is None:
        raise PersonaError("--rag-min-similarity needs the store's encoder")
    if select not in SELECTIONS:
        raise PersonaError(f"--select {select}: expected one of {', '.join(SELECTIONS)}")
    if not replace and store.get_plugins([name]):
        raise PersonaError(f"plug-in '{name}' exists; pass --replace to train it again")
    train = split_queries(store, task, "train")[:max_examples]
    if not train:
        raise PersonaError(f"store {store.uri} has no {task.name} training-split queries with gold outputs")
    dev = split_queries(store, task, "dev")
    chain = base_chain(store, base)
    llm = loaded(llm)
    retrieval = _training_retrieval(store, llm, task, rag_k, rag_min_similarity, encoder, max_input_tokens)
    train_users = sorted({q.user_id for q in train})
    if retrieval is None:
        examples, dev_examples = query_examples(train), query_examples(dev)
    else:
        examples, dev_examples = retrieval.query_examples(store, train), retrieval.query_examples(store, dev)
    examples += train_user_pairs(store, task, train_users, pairs, settings.seed, retrieval)
    apply_chain(llm, chain)
    scorer = _dev_scorer(llm, task, dev_examples, settings.batch_size) if dev_examples and select == "metric" else None
    trained = train_lora(
        llm, examples, settings, dev_examples or None, progress, checkpoint_path(store, name),
        stage=f"training {name}", dev_score=scorer,
    )  # fmt: skip
    weights = trained.weights.to_bytes()
    config = lora_plugin_config(llm, settings, trained, chain)
    config.update(
        train_users=len(train_users), train_examples=len(examples), train_queries=len(train),
        history_pairs=len(examples) - len(train), pairs=pairs, dev_examples=len(dev), rag_k=rag_k,
        rag_min_similarity=rag_min_similarity,
    )  # fmt: skip
    plugin = Plugin(
        name=name, kind=TASK_LORA, llm=llm.id, weights=weights, task=task.name, base=base,
        config=config, metrics=training_metrics(trained, len(weights)),
    )  # fmt: skip
    store.put_plugins([plugin])
    return plugin


def _training_retrieval(
    store: Store, llm: LLM, task: Task, rag_k: int, min_similarity: Optional[float],
    encoder: Optional[Callable[[], Encoder]], max_input_tokens: int,
) -> Optional[Retrieval]:  # fmt: skip
    """How the training prompts show retrieved history (None: they show none)."""
    if not rag_k:
        return None
    similarity_encoder = None
    if min_similarity is not None:
        similarity_encoder = encoder()
        store.check_encoder(similarity_encoder.id, similarity_encoder.dim)
    return Retrieval(task, TokenBudget(llm.tokenizer, max_input_tokens), rag_k, min_similarity, similarity_encoder)


def serve_task_lora(store: Store, task: Task, user_ids: list[str], options: MethodOptions) -> ServingPlan:
    return ServingPlan(chain=base_chain(store, options.plugin or task_lora_name(task)))


register(Method(
    name=TASK_LORA, summary="the LLM adapted to the task (one LoRA for every user)", needs="a task LoRA (--plugin, default task-lora-TASK)",
    trained_by="persona adapt", plan=serve_task_lora, options=("plugin",),
))  # fmt: skip
