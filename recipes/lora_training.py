"""Train one LoRA with peft on (prompt, target) examples: seeded, with progress, dev-loss model
selection and checkpoints that let an interrupted run resume where it stopped.

The LLM is changed only while training: peft's layers are removed again afterwards and the
trained adapter is returned as LoraWeights, so one loaded LLM trains many adapters in turn.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from recipes import PersonaError
from recipes.adapters import LoraWeights, check_target_modules, find_target_modules, from_peft_model
from recipes.backbones import LLM
from recipes.prompt_tokens import prompt_token_ids
from recipes.progress import Progress, report

IGNORE = -100
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class Example:
    """One training example: the target given the prompt, or language modelling on the target alone (prompt None)."""

    prompt: Optional[str]
    target: str


@dataclass
class LoraSettings:
    """How a LoRA is trained. `steps` None means `epochs` passes over the examples."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None
    learning_rate: float = 2e-4
    batch_size: int = 8
    steps: Optional[int] = None
    epochs: float = 1.0
    warmup: float = 0.1
    precision: str = "auto"
    max_length: int = 256
    eval_every: int = 50
    checkpoint_every: int = 25
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.r >= 1, f"--r must be at least 1, got {self.r}"),
            (self.alpha > 0, f"--alpha must be positive, got {self.alpha}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.learning_rate > 0, f"--lr must be positive, got {self.learning_rate}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.steps is None or self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.max_length >= 32, f"--max-length must be at least 32, got {self.max_length}"),
            (self.precision in PRECISIONS, f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PersonaError(message)

    def total_steps(self, n_examples: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * n_examples / self.batch_size))


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


def _causal_batch(llm: LLM, encoded: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Left-padded, so every target sits at the end and only the last positions need logits."""
    width = max(len(ids) for ids, _ in encoded)
    pad = llm.tokenizer.pad_token_id
    ids = [[pad] * (width - len(i)) + i for i, _ in encoded]
    labels = [[IGNORE] * (width - len(lab)) + lab for _, lab in encoded]
    mask = [[0] * (width - len(i)) + [1] * len(i) for i, _ in encoded]
    as_tensor = lambda rows: torch.tensor(rows, device=llm.device)  # noqa: E731
    mask_t = as_tensor(mask)
    return {
        "input_ids": as_tensor(ids), "attention_mask": mask_t, "labels": as_tensor(labels),
        "position_ids": (mask_t.cumsum(-1) - 1).clamp(min=0),
    }  # fmt: skip


def causal_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens, computing logits only for the
    positions that predict them (the vocabulary projection is most of a small model's cost)."""
    labels = batch["labels"]
    width = labels.shape[1]
    labelled = (labels != IGNORE).any(0).nonzero()
    keep = width - int(labelled[0]) + 1 if len(labelled) else 1
    keep = min(keep, width)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
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


def make_batch(llm: LLM, examples: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    """Model inputs with labels for a list of examples (right-padded; loss only on targets)."""
    if llm.is_seq2seq:
        return _seq2seq_batch(llm, examples, max_length)
    return _causal_batch(llm, [encode_example(llm, e, max_length) for e in examples])


# ---------- training ----------


def batch_order(n_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Which examples each step trains on: seeded shuffled passes, so a resumed run sees the same batches."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n_examples))
        rng.shuffle(epoch)
        order.extend(epoch)
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


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
    LLM as it is at that step, higher is better), the adapter with the best score is. With `checkpoint`, state is saved every
    `checkpoint_every` steps and a matching checkpoint found there is resumed from.
    """
    from peft import LoraConfig, get_peft_model

    settings.validate()
    if not examples:
        raise PersonaError("no training examples")
    targets = settings.target_modules or find_target_modules(llm.model)
    check_target_modules(llm.model, targets)
    steps = settings.total_steps(len(examples))
    plan = batch_order(len(examples), steps, settings.batch_size, settings.seed)
    fingerprint = _fingerprint(llm, examples, settings, targets)
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

        def step_loss(step: int) -> torch.Tensor:
            batch = make_batch(llm, [examples[i] for i in plan[step]], settings.max_length)
            with autocast_for(llm, settings.precision):
                return batch_loss(llm, model, batch)

        evaluate = (lambda state: _evaluate_dev(llm, model, dev, settings, state, dev_score)) if dev else None
        loop = TrainingLoop(steps, settings.warmup, settings.eval_every, settings.checkpoint_every, checkpoint, fingerprint)
        state, resumed = loop.run(model, optimizer, step_loss, evaluate, progress, stage)
        weights = from_peft_model(model)
    finally:
        model.unload()
        llm.model.eval()
        for parameter in llm.model.parameters():
            parameter.requires_grad_(False)
    return TrainedLora(
        weights=weights, target_modules=list(targets), steps=steps, seconds=round(state.seconds, 3),
        curve=state.curve, best_step=state.best_step, best_dev_loss=state.best_dev_loss,
        best_dev_score=state.best_dev_score, resumed_from=resumed,
    )  # fmt: skip


@dataclass
class TrainingLoop:
    """The optimisation loop every trainer here shares: linear warm-up and decay, the loss curve,
    evaluation every `eval_every` steps and at the end (the evaluator keeps the best state in
    TrainState.best, loaded back at the end), and checkpoints every `checkpoint_every` steps that
    a run with the same fingerprint resumes from (deleted once the run is done)."""

    steps: int
    warmup: float
    eval_every: int
    checkpoint_every: int
    checkpoint: Optional[Path] = None
    fingerprint: str = ""

    def run(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        step_loss: Callable[[int], torch.Tensor],
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
        tick(stage, state.step, steps)
        while state.step < steps:
            model.train()
            loss = step_loss(state.step)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.curve.append({"step": state.step, "loss": round(loss.item(), 5)})
            if evaluate is not None and (state.step % self.eval_every == 0 or state.step == steps):
                evaluate(state)
            if self.checkpoint is not None and state.step % self.checkpoint_every == 0 and state.step < steps:
                state.seconds = time.perf_counter() - started
                save_checkpoint(self.checkpoint, self.fingerprint, model, optimizer, schedule, state)
            tick(stage, state.step, steps)
        if state.best is not None:
            load_trainable(model, state.best)
        state.seconds = time.perf_counter() - started
        if self.checkpoint is not None and self.checkpoint.exists():
            self.checkpoint.unlink()
        return state, resumed


def autocast_dtype(llm: LLM, precision: str) -> Optional[torch.dtype]:
    """bfloat16 mixed precision where the hardware has it ('auto'), about twice as fast on a CPU
    with AVX-512/AMX bf16; the LoRA weights and optimizer stay float32 either way."""
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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def dev_loss(llm: LLM, model: Any, dev: list[Example], settings: LoraSettings) -> float:
    """Mean next-token loss over the dev examples (token-weighted)."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(dev), settings.batch_size):
        batch = make_batch(llm, dev[start : start + settings.batch_size], settings.max_length)
        labels = batch["labels"] if llm.is_seq2seq else batch["labels"][:, 1:]  # a causal first token is never predicted
        n = int((labels != IGNORE).sum())
        if n == 0:
            continue
        with autocast_for(llm, settings.precision):
            total += float(batch_loss(llm, model, batch)) * n
        tokens += n
    return total / max(tokens, 1)


@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)
    best: Optional[dict[str, torch.Tensor]] = None
    best_step: Optional[int] = None
    best_dev_loss: Optional[float] = None
    best_dev_score: Optional[float] = None


def _evaluate_dev(
    llm: LLM, model: Any, dev: list[Example], settings: LoraSettings, state: TrainState, dev_score: Optional[Callable[[], float]]
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


def _fingerprint(llm: LLM, examples: list[Example], settings: LoraSettings, targets: list[str]) -> str:
    """What a checkpoint must match to be resumed: the LLM, the examples and every setting."""
    digest = hashlib.sha256()
    digest.update(json.dumps([llm.id, asdict(settings), targets], sort_keys=True).encode())
    for example in examples:
        digest.update(json.dumps([example.prompt, example.target]).encode())
    return digest.hexdigest()


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
        return None
    load_trainable(model, saved["trainable"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    torch.set_rng_state(saved["rng"])
    state.__dict__.update(saved["state"])
    return state.step
