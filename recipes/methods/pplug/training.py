"""PPlug: train the user embedder with the LLM frozen, store it as a plug-in, turn any user's stored
history into soft tokens at serving time (no per-user training), and explain which history items
an input attended to.

Training reads training-split users' queries (the task's k=0 prompt and the user's gold answer)
with each user's stored history vectors; the dev split's loss picks the step that is kept. With
history dropout every example also appears once more with a random part of the history dropped,
as the paper does. A stopped run resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from recipes import PersonaError
from recipes.kit.history_pairs import PAIR_RECIPES, given_pair, paired_histories
from recipes.kit.training_data import checkpoint_path, split_queries
from recipes.kit.backbones import LLM, Encoder, load_encoder, loaded
from recipes.kit.plugins import apply_chain, base_chain
from recipes.kit.training_loop import (
    IGNORE, Example, StepResult, TrainingLoop, TrainState, autocast_for, batch_order, training_autocast, causal_batch, causal_loss,
    encode_example, eval_cadence, planned_steps, refuse_unless, settings_key, trainable_state, trainer_checks,
)  # fmt: skip
from recipes.methods.pplug.model import POOLINGS, EmbedderShape, UserEmbedder, describe, pad_histories, recent
from recipes.kit.progress import Progress
from recipes.kit.soft_prompts import embed_with_soft, soft_prompt_ids, soft_start, token_norm
from recipes.kit.tasks import Task
from store import Behavior, Plugin, Query, Store

PPLUG = "pplug"


def pplug_name(task: Task) -> str:
    """The default name of a task's trained embedder."""
    return f"{PPLUG}-{task.name}"


@dataclass
class PPlugSettings:
    """How the embedder is trained. `steps` None means `epochs` passes over the examples (None:
    auto, as planned_steps has it); `eval_every` None: about 8 evaluations."""

    pooling: str = "attention"
    personal: bool = True
    history_dropout: bool = False
    history_examples: bool = False
    pairs: str = "none"  # history_pairs recipe of the history examples (rules implies history_examples)
    history_cap: int = 512
    learning_rate: float = 1e-3
    encoder_learning_rate: float = 2e-5
    batch_size: int = 8
    steps: Optional[int] = None
    epochs: Optional[float] = 2.0
    warmup: float = 0.1
    eval_every: Optional[int] = 50
    checkpoint_every: int = 25
    max_length: int = 256
    precision: str = "auto"
    seed: int = 0
    max_minutes: Optional[float] = None

    def validate(self) -> None:
        refuse_unless([
            (self.pooling in POOLINGS, f"--pooling {self.pooling}: expected one of {', '.join(POOLINGS)}"),
            (self.pairs in PAIR_RECIPES, f"--pairs {self.pairs}: expected one of {', '.join(PAIR_RECIPES)}"),
            (self.history_cap >= 1, f"--history-cap must be at least 1, got {self.history_cap}"),
            (self.encoder_learning_rate >= 0, f"--encoder-lr must not be negative, got {self.encoder_learning_rate}"),
            *trainer_checks(self),
        ])

    def total_steps(self, n_examples: int) -> int:
        return planned_steps(self.steps, self.epochs, n_examples, self.batch_size)


@dataclass
class PPlugExample:
    """One query to learn from: the prompt the LLM sees, the gold answer, what the input encoder
    reads, and (for history-dropout copies) which of the user's history items are kept."""

    user_id: str
    prompt: str
    target: str
    text: str
    keep: Optional[list[int]] = None


# ---------- histories ----------


def history_vectors(store: Store, task: Task, user_ids: list[str], cap: int) -> dict[str, np.ndarray]:
    """Each user's `cap` most recent stored history vectors of the task (users without history are absent)."""
    histories = store.histories(sorted(set(user_ids)), task.name, with_vectors=True)
    return {u: recent([item.vector for item in items], cap) for u, items in histories.items() if items}


def require_histories(vectors: dict[str, np.ndarray], user_ids: list[str], task: Task) -> None:
    missing = [u for u in dict.fromkeys(user_ids) if u not in vectors]
    if missing:
        raise PersonaError(f"user '{missing[0]}' has no {task.name} history for PPlug's personal embedding ({len(missing)} users without)")


def check_encoder(store: Store, encoder_id: str) -> None:
    """The embedder reads the store's vectors: they must come from the encoder it was trained with."""
    known = store.encoder()
    if known is None:
        raise PersonaError(f"store {store.uri} has no history vectors (ingest users first)")
    if known[0] != encoder_id:
        raise PersonaError(f"the embedder was trained on vectors of encoder '{encoder_id}', but this store's are of '{known[0]}'")


# ---------- training ----------


def pplug_examples(task: Task, queries: list[Query], vectors: dict[str, np.ndarray], dropout: bool, seed: int) -> list[PPlugExample]:
    """Examples of the queries whose users have history; with `dropout`, each once more with a
    random part (uniform from none to all but one) of its user's history dropped."""
    rng = random.Random(seed)
    examples = []
    for q in queries:
        if q.output is None or q.user_id not in vectors:
            continue
        examples.append(PPlugExample(q.user_id, q.input, q.output, task.query_text(q.input)))
        n = len(vectors[q.user_id])
        if dropout and n > 1:
            kept = sorted(rng.sample(range(n), rng.randint(1, n - 1)))
            examples.append(PPlugExample(q.user_id, q.input, q.output, task.query_text(q.input), kept))
    return examples


def history_item_examples(task: Task, histories: dict[str, list[Behavior]], cap: int) -> list[PPlugExample]:
    """History items that have an input (the user's text being their answer to it) as extra
    examples, each read against the rest of the user's history (the item itself left out)."""
    examples = []
    for user, items in histories.items():
        kept = items[-cap:]
        for position, item in enumerate(kept):
            given = given_pair(task, item)
            if given is not None and len(kept) > 1:
                prompt, target = given
                others = [i for i in range(len(kept)) if i != position]
                examples.append(PPlugExample(user, prompt, target, task.query_text(prompt), others))
    return examples


def _user_history(vectors: dict[str, np.ndarray], example: PPlugExample) -> np.ndarray:
    history = vectors[example.user_id]
    return history if example.keep is None else history[example.keep]


def _causal_inputs(llm: LLM, examples: list[PPlugExample], n_soft: int, max_length: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Left-padded ids with soft-token placeholders, labels on the gold answer only, and where each
    row's soft tokens go; the template header every row opens with is shared (computed once)."""
    start = soft_start(llm)
    rows = []
    for e in examples:
        ids, labels = encode_example(llm, Example(e.prompt, e.target), max_length - n_soft)
        rows.append((ids[:start] + [llm.tokenizer.pad_token_id] * n_soft + ids[start:], labels[:start] + [IGNORE] * n_soft + labels[start:]))
    batch = causal_batch(llm, rows, prefix_limit=start)
    shared = batch["prefix_ids"].shape[1] if "prefix_ids" in batch else 0
    width = batch["input_ids"].shape[1]
    return batch, [width - (len(ids) - shared) + start - shared for ids, _ in rows]


def _seq2seq_inputs(llm: LLM, examples: list[PPlugExample], n_soft: int, max_length: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    tokenizer = llm.tokenizer
    prompts = [soft_prompt_ids(llm, e.prompt, n_soft, max_length, start=0)[0] for e in examples]
    encoded = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    targets = tokenizer([e.target for e in examples], max_length=max_length, truncation=True, padding=True, return_tensors="pt")
    labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, IGNORE)
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
    return {k: v.to(llm.device) for k, v in batch.items()}, [0] * len(examples)


def example_loss(llm: LLM, embedder: UserEmbedder, examples: list[PPlugExample], vectors: dict[str, np.ndarray], max_length: int) -> StepResult:
    """Mean cross-entropy of the gold answers given [soft tokens; prompt], through the frozen LLM
    (with the batch's example and token counts)."""
    history, mask = pad_histories([_user_history(vectors, e) for e in examples], embedder.device)
    soft = embedder([e.text for e in examples], history, mask)
    make = _seq2seq_inputs if llm.is_seq2seq else _causal_inputs
    batch, offsets = make(llm, examples, soft.shape[1], max_length)
    inputs_embeds = embed_with_soft(llm, batch["input_ids"], soft, offsets)
    tokens = int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE).sum() if llm.is_seq2seq else 0)
    if llm.is_seq2seq:
        loss = llm.model(attention_mask=batch["attention_mask"], labels=batch["labels"], inputs_embeds=inputs_embeds).loss
    else:
        loss = causal_loss(llm.model, batch, inputs_embeds)
    return StepResult(loss, len(examples), tokens)


@torch.no_grad()
def dev_loss(llm: LLM, embedder: UserEmbedder, dev: list[PPlugExample], vectors: dict[str, np.ndarray], settings: PPlugSettings) -> float:
    """Mean loss over the dev examples (weighted by examples)."""
    embedder.eval()
    total = 0.0
    for start in range(0, len(dev), settings.batch_size):
        chunk = dev[start : start + settings.batch_size]
        with autocast_for(llm, settings.precision):
            total += float(example_loss(llm, embedder, chunk, vectors, settings.max_length).loss) * len(chunk)
    return total / max(1, len(dev))


@dataclass
class TrainedEmbedder:
    embedder: UserEmbedder
    steps: int
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)
    best_step: Optional[int] = None
    best_dev_loss: Optional[float] = None
    resumed_from: Optional[int] = None
    tokens: int = 0
    ignored_checkpoint: Optional[str] = None


def build_embedder(encoder: Encoder, llm: LLM, settings: PPlugSettings) -> UserEmbedder:
    """A fresh embedder for this encoder and LLM (seeded), on the LLM's device."""
    torch.manual_seed(settings.seed)
    shape = EmbedderShape(
        encoder_dim=encoder.dim, llm_dim=llm.model.get_input_embeddings().weight.shape[1], pooling=settings.pooling,
        personal=settings.personal, token_norm=token_norm(llm), history_cap=settings.history_cap,
    )  # fmt: skip
    embedder = UserEmbedder(encoder.model, shape).to(llm.device)
    for parameter in embedder.input_encoder.parameters():
        parameter.requires_grad_(embedder.uses_input_encoder and settings.encoder_learning_rate > 0)
    return embedder


def train_embedder(
    llm: LLM,
    embedder: UserEmbedder,
    train: list[PPlugExample],
    dev: list[PPlugExample],
    vectors: dict[str, np.ndarray],
    settings: PPlugSettings,
    progress: Optional[Progress] = None,
    checkpoint: Optional[Any] = None,
    stage: str = "training embedder",
) -> TrainedEmbedder:
    """Train the embedder's trainable parts on `train` with the LLM frozen; the dev loss, measured
    every `eval_every` steps and at the end, picks the state that is kept."""
    settings.validate()
    if not train:
        raise PersonaError("no training examples")
    steps = settings.total_steps(len(train))
    plan = batch_order(len(train), steps, settings.batch_size, settings.seed, [len(e.prompt) + len(e.target) for e in train])
    encoder_params = [p for p in embedder.input_encoder.parameters() if p.requires_grad]
    head_params = [p for n, p in embedder.named_parameters() if p.requires_grad and not n.startswith("input_encoder.")]
    groups = [{"params": head_params, "lr": settings.learning_rate}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": settings.encoder_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    def step_loss(step: int) -> StepResult:
        with training_autocast(llm, settings.precision):
            return example_loss(llm, embedder, [train[i] for i in plan[step]], vectors, settings.max_length)

    evaluate = (lambda state: _evaluate(llm, embedder, dev, vectors, settings, state)) if dev else None
    fingerprint = _fingerprint(llm, train + dev, vectors, settings)
    loop = TrainingLoop(
        steps, settings.warmup, eval_cadence(settings.eval_every, steps), settings.checkpoint_every, checkpoint, fingerprint,
        settings.max_minutes,
    )  # fmt: skip
    state, resumed = loop.run(embedder, optimizer, step_loss, evaluate, progress, stage)
    embedder.eval()
    return TrainedEmbedder(
        embedder, state.step, round(state.seconds, 3), state.curve, state.best_step, state.best_dev_loss, resumed, state.tokens,
        state.ignored_checkpoint,
    )


def _evaluate(llm: LLM, embedder: UserEmbedder, dev: list[PPlugExample], vectors: dict[str, np.ndarray], settings: PPlugSettings, state: TrainState) -> None:
    rng = torch.get_rng_state()
    loss = round(dev_loss(llm, embedder, dev, vectors, settings), 5)
    torch.set_rng_state(rng)
    state.curve[-1]["dev_loss"] = loss
    if state.best_dev_loss is None or loss < state.best_dev_loss:
        state.best = trainable_state(embedder)
        state.best_step, state.best_dev_loss = state.step, loss


def _fingerprint(llm: LLM, examples: list[PPlugExample], vectors: dict[str, np.ndarray], settings: PPlugSettings) -> str:
    """What a checkpoint must match to be resumed: the LLM with the bases merged into it
    (`LLM.state_id`), the training and dev examples, the histories and every setting."""
    digest = hashlib.sha256(json.dumps([llm.state_id, settings_key(settings)], sort_keys=True).encode())
    for e in examples:
        digest.update(json.dumps([e.user_id, e.prompt, e.target, e.keep]).encode())
        digest.update(vectors[e.user_id].tobytes())
    return digest.hexdigest()


def train_pplug(
    store: Store,
    llm: LLM | Callable[[], LLM],
    task: Task,
    settings: PPlugSettings,
    name: str,
    base: Optional[str] = None,
    encoder: Optional[Encoder] = None,
    replace: bool = False,
    max_examples: Optional[int] = None,
    progress: Optional[Progress] = None,
) -> Plugin:
    """Train PPlug's embedder on the training-split users' queries with the LLM (and `base`, merged
    in) frozen, keep the step with the lowest dev-split loss, and store it as plug-in `name`.
    With `history_examples`, training users' history items that have an input are examples too.
    Test users' queries are never read."""
    settings.validate()
    if not replace and store.get_plugins([name]):
        raise PersonaError(f"plug-in '{name}' exists; pass --replace to train it again")
    known = store.encoder()
    if known is None:
        raise PersonaError(f"store {store.uri} has no history vectors (ingest users first)")
    train_queries = split_queries(store, task, "train")
    dev_queries = split_queries(store, task, "dev")
    vectors = history_vectors(store, task, [q.user_id for q in train_queries + dev_queries], settings.history_cap)
    train = pplug_examples(task, train_queries, vectors, settings.history_dropout, settings.seed)
    if settings.history_examples or settings.pairs != "none":
        train_users = sorted({q.user_id for q in train_queries})
        histories = paired_histories(store, task, store.histories(train_users, task.name), settings.pairs, settings.seed)
        train += history_item_examples(task, histories, settings.history_cap)
    train = train[:max_examples]
    dev = pplug_examples(task, dev_queries, vectors, False, settings.seed)
    if not train:
        raise PersonaError(f"store {store.uri} has no {task.name} training-split queries with gold outputs and history")
    chain = base_chain(store, base)
    llm = loaded(llm)
    apply_chain(llm, chain)
    encoder = encoder or load_encoder(known[0], str(llm.device))
    if encoder.id != known[0]:
        raise PersonaError(f"the store's vectors are of encoder '{known[0]}', not '{encoder.id}'")
    embedder = build_embedder(encoder, llm, settings)
    trained = train_embedder(llm, embedder, train, dev, vectors, settings, progress, checkpoint_path(store, name), f"training {name}")
    weights = embedder.to_bytes()
    plugin = Plugin(
        name=name, kind=PPLUG, llm=llm.id, encoder=encoder.id, weights=weights, task=task.name, base=base,
        config={
            "shape": embedder.shape.as_config(), "settings": asdict(settings), "seq2seq": llm.is_seq2seq,
            "base_chain": [p.name for p in chain], "train_users": len({e.user_id for e in train}),
            "train_examples": len(train), "dev_examples": len(dev),
        },
        metrics={
            "train_seconds": trained.seconds, "steps": trained.steps, "weights_bytes": len(weights),
            "final_loss": trained.curve[-1]["loss"] if trained.curve else None, "best_step": trained.best_step,
            "best_dev_loss": trained.best_dev_loss, "resumed_from": trained.resumed_from,
            "ignored_checkpoint": trained.ignored_checkpoint, "curve": trained.curve,
            **describe(embedder),
        },
    )  # fmt: skip
    store.put_plugins([plugin])
    return plugin
