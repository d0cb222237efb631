"""Train one LoRA with peft on (prompt, target) examples: seeded, with progress, dev-loss model
selection and checkpoints that let an interrupted run resume where it stopped.

The LLM is changed only while training: peft's layers are removed again afterwards and the
trained adapter is returned as LoraWeights, so one loaded LLM trains many adapters in turn.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from recipes import PersonaError
from recipes.kit.lora import LoraWeights, check_target_modules, find_target_modules, from_peft_model
from recipes.kit.backbones import LLM, with_cache
from recipes.kit.prompt_tokens import prompt_token_ids
from recipes.kit.progress import Progress, report

IGNORE = -100
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class Example:
    """One training example: the target given the prompt, or language modelling on the target alone (prompt None)."""

    prompt: Optional[str]
    target: str


def refuse_unless(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first failed check: settings are refused before any model loads."""
    for ok, message in checks:
        if not ok:
            raise PersonaError(message)


def trainer_checks(settings: Any) -> list[tuple[bool, str]]:
    """The checks every trainer's settings share (LoRA, PPlug): rate, batch, length of training,
    evaluation cadence, example length, precision and time limit."""
    s = settings
    return [
        (s.learning_rate > 0, f"--lr must be positive, got {s.learning_rate}"),
        (s.batch_size >= 1, f"--batch-size must be at least 1, got {s.batch_size}"),
        (s.steps is None or s.steps >= 1, f"--steps must be at least 1, got {s.steps}"),
        (s.epochs is None or s.epochs > 0, f"--epochs must be positive, got {s.epochs}"),
        (s.eval_every is None or s.eval_every >= 1, f"--eval-every must be at least 1, got {s.eval_every}"),
        (s.max_length >= 32, f"--max-length must be at least 32, got {s.max_length}"),
        (s.precision in PRECISIONS, f"--precision {s.precision}: expected one of {', '.join(PRECISIONS)}"),
        (s.max_minutes is None or s.max_minutes > 0, f"--max-minutes must be positive, got {s.max_minutes}"),
    ]



@dataclass
class LoraSettings:
    """How a LoRA is trained. `steps` None means `epochs` passes over the examples; `epochs` None
    (auto) means as many as the data calls for (planned_steps); `eval_every` None: about 8 evaluations."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None
    learning_rate: float = 2e-4
    batch_size: int = 8
    steps: Optional[int] = None
    epochs: Optional[float] = 1.0
    warmup: float = 0.1
    precision: str = "auto"
    max_length: int = 256
    eval_every: Optional[int] = 50
    checkpoint_every: int = 25
    seed: int = 0
    max_minutes: Optional[float] = None

    def validate(self) -> None:
        refuse_unless([
            (self.r >= 1, f"--r must be at least 1, got {self.r}"),
            (self.alpha > 0, f"--alpha must be positive, got {self.alpha}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            *trainer_checks(self),
        ])

    def total_steps(self, n_examples: int) -> int:
        return planned_steps(self.steps, self.epochs, n_examples, self.batch_size)


AUTO_MAX_EPOCHS = 4
AUTO_EXAMPLES = 2400
"""--epochs auto: 4 passes over small data, at most this many examples drawn over large data (300
steps at batch 8: about 12 minutes on 2 CPU cores for LaMP-7's short examples)."""


def planned_steps(steps: Optional[int], epochs: Optional[float], n_examples: int, batch_size: int) -> int:
    """Optimizer steps of a run: `steps` if given, else `epochs` passes, else (auto) AUTO_MAX_EPOCHS
    passes capped at AUTO_EXAMPLES examples, so a large pair set trains in minutes on a sample of it."""
    if steps:
        return steps
    if epochs is not None:
        return max(1, math.ceil(epochs * n_examples / batch_size))
    return max(1, math.ceil(min(AUTO_MAX_EPOCHS * n_examples, max(AUTO_EXAMPLES, batch_size)) / batch_size))


def eval_cadence(eval_every: Optional[int], steps: int) -> int:
    """Evaluate every `eval_every` steps, or (None) about 8 times over the run."""
    return eval_every or max(1, math.ceil(steps / 8))


@dataclass
class TrainedLora:
    weights: LoraWeights
    target_modules: list[str]
    steps: int
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)
    best_step: Optional[int] = None
    best_dev_loss: Optional[float] = None
    best_dev_score: Optional[float] = None
    resumed_from: Optional[int] = None
    stopped_early: bool = False
    tokens: int = 0
    ignored_checkpoint: Optional[str] = None


# ---------- tokenization ----------


def encode_example(llm: LLM, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE on the prompt) of a causal-LM example, within max_length."""
    tokenizer = llm.tokenizer
    eos = tokenizer.eos_token_id
    if example.prompt is None:
        ids = tokenizer(example.target, add_special_tokens=not llm.is_chat)["input_ids"][: max_length - 1] + [eos]
        return ids, list(ids)
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"][: max_length // 2] + [eos]
    prompt = prompt_token_ids(llm, example.prompt, max_input_tokens=max_length - len(target))
    return prompt + target, [IGNORE] * len(prompt) + target


MIN_SHARED_PREFIX = 4
"""A common prefix shorter than this is not worth a forward pass of its own."""


def shared_prefix_length(rows: list[tuple[list[int], list[int]]], limit: Optional[int] = None) -> int:
    """How many leading tokens all rows have in common before anything is predicted (the logit
    in front of a row's first labelled token stays outside the prefix), at most `limit`."""
    if len(rows) < 2:
        return 0
    first = rows[0][0]
    length = min(len(ids) for ids, _ in rows) if limit is None else limit
    for ids, labels in rows:
        labelled = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
        length = min(length, labelled - 1, len(ids) - 1)
        same = 0
        while same < length and ids[same] == first[same]:
            same += 1
        length = same
    return length if length >= MIN_SHARED_PREFIX else 0


def causal_batch(
    llm: LLM, rows: list[tuple[list[int], list[int]]], share_prefix: bool = True, prefix_limit: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """Tensors for tokenized causal rows, left-padded so every target ends at the last column
    (only the last positions need logits).

    Training prompts mostly open with the same tokens: the chat template's system turn and the
    task's instruction are a third of a LaMP-7 example. With `share_prefix` that common prefix
    becomes `prefix_ids`, run once per batch instead of once per row (causal_loss); the rows
    keep the rest, `attention_mask` covers prefix and row, and `position_ids` go on after the
    prefix. `prefix_limit` caps it (PPlug's soft tokens must stay in the rows)."""
    shared = shared_prefix_length(rows, prefix_limit) if share_prefix else 0
    prefix = rows[0][0][:shared]
    rows = [(ids[shared:], labels[shared:]) for ids, labels in rows]
    width = max(len(ids) for ids, _ in rows)
    pad = llm.tokenizer.pad_token_id
    as_tensor = lambda values: torch.tensor(values, device=llm.device)  # noqa: E731
    mask = as_tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in rows])
    batch = {
        "input_ids": as_tensor([[pad] * (width - len(i)) + i for i, _ in rows]),
        "attention_mask": torch.cat([mask.new_ones(len(rows), shared), mask], dim=1),
        "labels": as_tensor([[IGNORE] * (width - len(lab)) + lab for _, lab in rows]),
        "position_ids": shared + (mask.cumsum(-1) - 1).clamp(min=0),
    }
    if shared:
        batch["prefix_ids"] = as_tensor([prefix])
    return batch


def prefix_cache(model: Any, prefix_ids: torch.Tensor, rows: int) -> DynamicCache:
    """The KV cache of a prefix every row shares, computed once (with gradients when training)
    and broadcast to `rows` rows."""
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix_ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)
    return cache


def causal_loss(model: Any, batch: dict[str, torch.Tensor], inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens, computing logits only for the
    positions that predict them (the vocabulary projection is most of a small model's cost),
    and the batch's shared prefix only once. `inputs_embeds` replaces the rows' token ids."""
    labels = batch["labels"]
    width = labels.shape[1]
    labelled = (labels != IGNORE).any(0).nonzero()
    keep = width - int(labelled[0]) + 1 if len(labelled) else 1
    keep = min(keep, width)
    inputs = {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}
    if inputs_embeds is None:
        inputs["input_ids"] = batch["input_ids"]
    else:
        inputs["inputs_embeds"] = inputs_embeds
    if "prefix_ids" in batch:
        inputs.update(with_cache(model, prefix_cache(model, batch["prefix_ids"], labels.shape[0])), use_cache=True)
    logits = model(**inputs, logits_to_keep=keep).logits
    targets = torch.cat([labels[:, width - keep + 1 :], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def batch_loss(llm: LLM, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss if llm.is_seq2seq else causal_loss(model, batch)


def _seq2seq_batch(llm: LLM, examples: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    tokenizer = llm.tokenizer
    inputs = tokenizer(
        [e.prompt or "" for e in examples], max_length=max_length, truncation=True, padding=True, return_tensors="pt"
    )
    targets = tokenizer([e.target for e in examples], max_length=max_length, truncation=True, padding=True, return_tensors="pt")
    labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, IGNORE)
    return {**{k: v.to(llm.device) for k, v in inputs.items()}, "labels": labels.to(llm.device)}


class TokenizedExamples:
    """Examples tokenized once (not again at every step they are drawn), batched on demand."""

    def __init__(self, llm: LLM, examples: list[Example], max_length: int) -> None:
        self.llm, self.examples, self.max_length = llm, examples, max_length
        self.rows = None if llm.is_seq2seq else [encode_example(llm, e, max_length) for e in examples]
        self.lengths = (
            [len(e.prompt or "") + len(e.target) for e in examples] if self.rows is None else [len(ids) for ids, _ in self.rows]
        )
        """Tokens of each example (characters for seq2seq, which tokenizes per batch)."""

    def __len__(self) -> int:
        return len(self.examples)

    def tokens(self, indices: Iterable[int]) -> int:
        """Tokens of these examples (0 for seq2seq)."""
        return sum(self.lengths[i] for i in indices) if self.rows is not None else 0

    def batch(self, indices: Iterable[int], share_prefix: bool = True) -> dict[str, torch.Tensor]:
        """With `share_prefix` the dict carries `prefix_ids`, which only `causal_loss` reads (a plain
        model call ignores the keyword and so the prefix): pass False for any other forward pass."""
        chosen = list(indices)
        if self.rows is None:
            return _seq2seq_batch(self.llm, [self.examples[i] for i in chosen], self.max_length)
        return causal_batch(self.llm, [self.rows[i] for i in chosen], share_prefix)


# ---------- training ----------


GROUP_BATCHES = 32
"""Length grouping sorts this many batches' worth of drawn examples by length at a time."""


def batch_order(n_examples: int, steps: int, batch_size: int, seed: int, lengths: Optional[list[int]] = None) -> list[list[int]]:
    """Which examples each step trains on: seeded shuffled passes, so a resumed run sees the same
    batches. With `lengths`, each run of GROUP_BATCHES batches' worth of a pass is sorted by
    length and cut into batches, which are then shuffled, so a batch pads little; every example
    is still drawn once per pass."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n_examples))
        rng.shuffle(epoch)
        order.extend(epoch if lengths is None else _length_grouped(epoch, lengths, batch_size, rng))
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def _length_grouped(epoch: list[int], lengths: list[int], batch_size: int, rng: random.Random) -> list[int]:
    span = batch_size * GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(epoch), span):
        group = sorted(epoch[start : start + span], key=lambda i: lengths[i])
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    short = [b for b in batches if len(b) < batch_size]  # at most one: it goes last, so later cuts stay aligned
    full = [b for b in batches if len(b) == batch_size]
    rng.shuffle(full)
    return [i for b in full + short for i in b]


class StepResult(NamedTuple):
    """What one optimizer step trained on: its loss, examples and tokens (for the rates shown)."""

    loss: torch.Tensor
    examples: int
    tokens: int


def train_lora(
    llm: LLM,
    examples: list[Example],
    settings: LoraSettings,
    dev: Optional[list[Example]] = None,
    progress: Optional[Progress] = None,
    checkpoint: Optional[Path] = None,
    stage: str = "training",
    dev_score: Optional[Callable[[], float]] = None,
) -> TrainedLora:
    """Train a fresh LoRA on `examples` over the LLM as loaded (bases already merged into it).

    With `dev`, the dev loss is measured every `eval_every` steps and at the end, and the
    adapter with the lowest dev loss is returned; with `dev_score` too (a task metric of the
    LLM as it is at that step, higher is better), the adapter with the best score is. With
    `checkpoint`, state is saved every `checkpoint_every` steps and a matching checkpoint found
    there is resumed from (the plug-ins merged into the LLM, `LLM.state_id`, are part of what
    must match). Examples are tokenized once and batched by similar length.
    """
    from peft import LoraConfig, get_peft_model

    settings.validate()
    if not examples:
        raise PersonaError("no training examples")
    targets = settings.target_modules or find_target_modules(llm.model)
    check_target_modules(llm.model, targets)
    steps = settings.total_steps(len(examples))
    data = TokenizedExamples(llm, examples, settings.max_length)
    plan = batch_order(len(examples), steps, settings.batch_size, settings.seed, data.lengths)
    fingerprint = _fingerprint(llm, examples, settings, targets, dev or [], dev_score is not None)
    torch.manual_seed(settings.seed)
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets, bias="none",
        task_type="SEQ_2_SEQ_LM" if llm.is_seq2seq else "CAUSAL_LM",
    )  # fmt: skip
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(llm.model, config)
    try:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)

        def step_loss(step: int) -> StepResult:
            batch = data.batch(plan[step])
            with training_autocast(llm, settings.precision):
                return StepResult(batch_loss(llm, model, batch), len(plan[step]), data.tokens(plan[step]))

        dev_data = TokenizedExamples(llm, dev, settings.max_length) if dev else None
        evaluate = (lambda state: _evaluate_dev(llm, model, dev_data, settings, state, dev_score)) if dev_data else None
        loop = TrainingLoop(
            steps, settings.warmup, eval_cadence(settings.eval_every, steps), settings.checkpoint_every, checkpoint, fingerprint,
            settings.max_minutes,
        )  # fmt: skip
        state, resumed = loop.run(model, optimizer, step_loss, evaluate, progress, stage)
        weights = from_peft_model(model)
    finally:
        model.unload()
        llm.model.eval()
        for parameter in llm.model.parameters():
            parameter.requires_grad_(False)
    return TrainedLora(
        weights=weights, target_modules=list(targets), steps=state.step, seconds=round(state.seconds, 3),
        curve=state.curve, best_step=state.best_step, best_dev_loss=state.best_dev_loss,
        best_dev_score=state.best_dev_score, resumed_from=resumed, stopped_early=state.step < steps, tokens=state.tokens,
        ignored_checkpoint=state.ignored_checkpoint,
    )  # fmt: skip


@dataclass
class TrainingLoop:
    """The optimisation loop every trainer here shares: linear warm-up and decay, the loss curve,
    evaluation every `eval_every` steps and at the end (the evaluator keeps the best state in
    TrainState.best, loaded back at the end), checkpoints every `checkpoint_every` steps that a
    run with the same fingerprint resumes from (deleted once the run is done), and an optional
    time budget after which it evaluates once more and stops, keeping the best state.

    Progress reports steps, examples/s, tokens/s and the loss. After every step the memory the
    step freed is handed back to the system: activations change shape from batch to batch, and
    glibc otherwise keeps every freed size cached, so a process grew by gigabytes in 30 steps."""

    steps: int
    warmup: float
    eval_every: int
    checkpoint_every: int
    checkpoint: Optional[Path] = None
    fingerprint: str = ""
    max_minutes: Optional[float] = None

    def run(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        step_loss: Callable[[int], StepResult],
        evaluate: Optional[Callable[[TrainState], None]] = None,
        progress: Optional[Progress] = None,
        stage: str = "training",
    ) -> tuple[TrainState, Optional[int]]:
        """Train `model`'s trainable parameters; returns the final state (seconds included) and the step resumed from."""
        steps, warmup = self.steps, int(self.warmup * self.steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps))
        state = TrainState()
        resumed = resume_checkpoint(self.checkpoint, self.fingerprint, model, optimizer, schedule, state)
        tick = report(progress)
        started = time.perf_counter() - state.seconds
        deadline = None if self.max_minutes is None else time.perf_counter() + 60 * self.max_minutes
        rate = Rate()
        tick(stage, state.step, steps)
        while state.step < steps:
            model.train()
            result = step_loss(state.step)
            result.loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += result.tokens
            state.curve.append({"step": state.step, "loss": round(result.loss.item(), 5)})
            del result
            release_freed_memory()
            out_of_time = deadline is not None and time.perf_counter() > deadline
            if evaluate is not None and (state.step % self.eval_every == 0 or state.step == steps or out_of_time):
                evaluate(state)
            if self.checkpoint is not None and state.step % self.checkpoint_every == 0 and state.step < steps:
                state.seconds = time.perf_counter() - started
                save_checkpoint(self.checkpoint, self.fingerprint, model, optimizer, schedule, state)
            tick(stage, state.step, steps, note=rate.note(state))
            if out_of_time:
                break
        if state.best is not None:
            load_trainable(model, state.best)
        state.seconds = time.perf_counter() - started
        if self.checkpoint is not None and self.checkpoint.exists():
            self.checkpoint.unlink()
        return state, resumed


class Rate:
    """Examples and tokens per second over the steps since the last report, for the progress line."""

    def __init__(self) -> None:
        self.time, self.step, self.tokens = time.perf_counter(), None, 0

    def note(self, state: "TrainState") -> str:
        now = time.perf_counter()
        if self.step is None or now <= self.time:
            self.time, self.step, self.tokens = now, state.step, state.tokens
            return f"loss {state.curve[-1]['loss']:.3f}"
        seconds = now - self.time
        per_step = seconds / max(1, state.step - self.step)
        tokens = (state.tokens - self.tokens) / seconds
        self.time, self.step, self.tokens = now, state.step, state.tokens
        return f"{per_step:.2f} s/step · {tokens:,.0f} tokens/s · loss {state.curve[-1]['loss']:.3f}"


def release_freed_memory() -> None:
    """Give memory freed by the last step back to the system (glibc only; elsewhere a no-op)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def autocast_dtype(llm: LLM, precision: str) -> Optional[torch.dtype]:
    """bfloat16 mixed precision where the hardware has it ('auto'): on a CPU with AVX-512/AMX
    bf16, 1.1-1.4x as fast as float32 for a LoRA on LaMP-7 pairs (benchmarks/training/attention.py,
    with training_autocast's attention kernel); the LoRA weights and optimizer stay float32 either way. The
    environment variable PERSONA_PRECISION (float32|bfloat16) decides what 'auto' means, so a
    figure that must hold on every CPU can be measured in float32 without editing commands."""
    if precision == "auto":
        precision = os.environ.get("PERSONA_PRECISION") or "auto"
        if precision not in PRECISIONS:
            raise PersonaError(f"PERSONA_PRECISION={precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if llm.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_for(llm: LLM, precision: str):
    dtype = autocast_dtype(llm, precision)
    return torch.autocast(llm.device.type, dtype=dtype, enabled=dtype is not None)


@contextlib.contextmanager
def autocast_weights(llm: LLM, precision: str) -> Iterator[None]:
    """Inference under autocast_for with the frozen linear layers' weights held in the autocast
    dtype meanwhile: autocast casts a frozen weight again on every call (it caches only weights
    that take gradients), the same cast every time, so casting once gives identical results
    faster. Weights shared with the embeddings (a tied output head) are left alone; the
    float32 weights come back on exit."""
    dtype = autocast_dtype(llm, precision)
    kept: dict[torch.nn.Linear, torch.Tensor] = {}
    if dtype is not None:
        embeddings = {id(m.weight) for m in llm.model.modules() if isinstance(m, torch.nn.Embedding)}
        for module in llm.model.modules():
            if type(module) is torch.nn.Linear and not module.weight.requires_grad and id(module.weight) not in embeddings:
                kept[module] = module.weight.data
                module.weight.data = module.weight.data.to(dtype)
    try:
        with autocast_for(llm, precision):
            yield
    finally:
        for module, weight in kept.items():
            module.weight.data = weight


@contextlib.contextmanager
def training_autocast(llm: LLM, precision: str) -> Iterator[None]:
    """autocast_for a training step's forward pass, with attention's plain (math) kernel where
    that is bfloat16 on CPU: torch's CPU flash-attention backward is slow there on short rows
    (a LoRA on LaMP-7 pairs: 1.22x faster at batch 4, 1.09x at batch 8; in float32 no gain,
    benchmarks/training/attention.py). The kernel chosen in the forward pass is the one its
    backward runs; GPUs keep their fused kernels."""
    plain = llm.device.type == "cpu" and autocast_dtype(llm, precision) is not None
    with autocast_for(llm, precision), (sdpa_kernel(SDPBackend.MATH) if plain else contextlib.nullcontext()):
        yield


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def dev_loss(llm: LLM, model: Any, dev: TokenizedExamples, settings: LoraSettings) -> float:
    """Mean next-token loss over the dev examples (token-weighted, so batching them by length changes nothing)."""
    model.eval()
    total, tokens = 0.0, 0
    order = sorted(range(len(dev)), key=lambda i: dev.lengths[i])
    for start in range(0, len(order), settings.batch_size):
        batch = dev.batch(order[start : start + settings.batch_size])
        labels = batch["labels"] if llm.is_seq2seq else batch["labels"][:, 1:]  # a causal first token is never predicted
        n = int((labels != IGNORE).sum())
        if n == 0:
            continue
        with autocast_for(llm, settings.precision):
            total += float(batch_loss(llm, model, batch)) * n
        tokens += n
    release_freed_memory()
    return total / max(tokens, 1)


@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0
    tokens: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    best: Optional[dict[str, torch.Tensor]] = None
    best_step: Optional[int] = None
    best_dev_loss: Optional[float] = None
    best_dev_score: Optional[float] = None
    ignored_checkpoint: Optional[str] = None  # why a checkpoint found at the path was not resumed


def _evaluate_dev(
    llm: LLM, model: Any, dev: TokenizedExamples, settings: LoraSettings, state: TrainState, dev_score: Optional[Callable[[], float]]
) -> None:
    rng_state = torch.get_rng_state()
    loss = round(dev_loss(llm, model, dev, settings), 5)
    score = round(dev_score(), 5) if dev_score is not None else None
    torch.set_rng_state(rng_state)
    state.curve[-1]["dev_loss"] = loss
    if score is not None:
        state.curve[-1]["dev_score"] = score
        better = state.best_dev_score is None or score > state.best_dev_score
    else:
        better = state.best_dev_loss is None or loss < state.best_dev_loss
    if better:
        state.best = trainable_state(model)
        state.best_step, state.best_dev_loss, state.best_dev_score = state.step, loss, score


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    for name, tensor in tensors.items():
        parameters[name].copy_(tensor)


# ---------- checkpoints ----------


def _fingerprint(
    llm: LLM, examples: list[Example], settings: LoraSettings, targets: list[str], dev: list[Example], by_metric: bool
) -> str:
    """What a checkpoint must match to be resumed: the LLM with what is merged into it, the
    examples, every setting, and what picks the kept step (the dev examples, whether a metric does)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([llm.state_id, settings_key(settings), targets], sort_keys=True).encode())
    for example in examples:
        digest.update(json.dumps([example.prompt, example.target]).encode())
    digest.update(json.dumps([[(e.prompt, e.target) for e in dev], by_metric]).encode())
    return digest.hexdigest()


def settings_key(settings: Any) -> dict:
    """The settings that decide what a training learns (a time budget does not)."""
    return {k: v for k, v in asdict(settings).items() if k != "max_minutes"}


def save_checkpoint(path: Path, fingerprint: str, model: Any, optimizer: Any, schedule: Any, state: TrainState) -> None:
    """Write the checkpoint beside its final name and rename it, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".partial")
    torch.save(
        {
            "fingerprint": fingerprint, "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "rng": torch.get_rng_state(), "state": state.__dict__,
        },
        staging,
    )  # fmt: skip
    os.replace(staging, path)


def resume_checkpoint(path: Optional[Path], fingerprint: str, model: Any, optimizer: Any, schedule: Any, state: TrainState) -> Optional[int]:
    """Load a checkpoint of this very run if there is one; returns the step resumed from."""
    if path is None or not path.exists():
        return None
    saved = torch.load(path, weights_only=False)
    if saved.get("fingerprint") != fingerprint:
        state.ignored_checkpoint = (
            f"checkpoint {path} is of a run with other data, settings or base; training started over"
        )
        return None
    load_trainable(model, saved["trainable"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    torch.set_rng_state(saved["rng"])
    state.__dict__.update(saved["state"])
    return state.step
