"""Per-Pcs gates: one vector per LoRA module of a sharer that says when its piece should speak.

Two kinds. `trained` (the paper): the gated module computes z = W·v + c·B·A·v·sigmoid(g·v); the
LoRA (A, B, c) stays frozen and only g is trained, zero-initialized (every gate half open at the
start), with the usual next-token loss on the sharer's own history. `mean` (no training): g is
the mean direction of the module's inputs v over the sharer's own history, at the positions
assembly scores (the answer tokens), read through the base LLM. Assembly later scores a piece by
how well its gate direction matches a target user's activations; for mean gates after taking
out what every sharer's activations share (the pool's mean gate), so that what is left is how a
sharer's writing differs from the others'.

Why both: trained gates, each fitted alone to its own sharer's history, learn where a piece
helps, which is much the same place for every sharer. On the demo's planted styles, 4 sharers
with 50 trained gate steps each gave the target's same-style sharer 0.243 of the weight (0.25 by
chance); mean gates, scored centred, chose the same-style sharer in every module for all 7 styled
test users.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from recipes import PersonaError
from recipes.kit.hooks import forward_hooks
from recipes.kit.lora import LoraWeights, check_fits
from recipes.kit.backbones import LLM
from recipes.kit.training_loop import (
    PRECISIONS, Example, StepResult, TokenizedExamples, TrainingLoop, batch_loss, batch_order, refuse_unless, training_autocast,
)  # fmt: skip
from recipes.kit.progress import Progress


GATE_KINDS = ("trained", "mean")
"""How a sharer's gates are made: trained with the LoRA frozen (the paper), or the mean direction
of each module's inputs over the sharer's history (no training)."""


@dataclass
class GateSettings:
    """How the gates of one sharer are made; `steps` and `learning_rate` train `trained` gates
    (the paper: about 50-200 steps)."""

    steps: int = 50
    learning_rate: float = 2e-2
    batch_size: int = 4
    max_length: int = 256
    precision: str = "auto"
    seed: int = 0
    kind: str = "trained"

    def validate(self) -> None:
        refuse_unless([
            (self.kind in GATE_KINDS, f"--gates {self.kind}: expected one of {', '.join(GATE_KINDS)}"),
            (self.steps >= 1, f"--gate-steps must be at least 1, got {self.steps}"),
            (self.learning_rate > 0, f"--gate-lr must be positive, got {self.learning_rate}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.max_length >= 32, f"--max-length must be at least 32, got {self.max_length}"),
            (self.precision in PRECISIONS, f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}"),
        ])


@dataclass
class TrainedGates:
    gates: dict[str, torch.Tensor]
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0


@contextmanager
def gated_lora(model: torch.nn.Module, lora: LoraWeights, gates: dict[str, torch.Tensor]) -> Iterator[None]:
    """While the block runs, every module of `lora` outputs W·v + c·B·A·v·sigmoid(g·v)."""
    check_fits(model, lora)
    device = next(model.parameters()).device
    hooks = {
        path: _gated_hook(a.to(device, torch.float32), (b.float() * lora.scales[path]).to(device), gates[path])
        for path, (a, b) in lora.modules.items()
    }
    with forward_hooks(model, hooks):
        yield


def _gated_hook(a: torch.Tensor, b: torch.Tensor, gate: torch.Tensor):
    def add_gated(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        opening = torch.sigmoid(x @ gate.to(x.dtype)).unsqueeze(-1)
        return output + ((x @ a.T.to(x.dtype)) @ b.T.to(x.dtype)) * opening

    return add_gated


def train_gates(
    llm: LLM,
    lora: LoraWeights,
    examples: list[Example],
    settings: GateSettings,
    progress: Optional[Progress] = None,
    stage: str = "training gates",
) -> TrainedGates:
    """Train one gate per module of the frozen `lora` on `examples` over the LLM as loaded,
    with the trainers' shared loop (tokenized once, batched by length)."""
    settings.validate()
    if not examples:
        raise PersonaError("no examples to train the gates on")
    device = next(llm.model.parameters()).device
    for parameter in llm.model.parameters():  # only the gates learn; no gradients for the LLM
        parameter.requires_grad_(False)
    gates = torch.nn.ParameterDict(
        {_key(path): torch.nn.Parameter(torch.zeros(a.shape[1], device=device)) for path, (a, _) in lora.modules.items()}
    )
    optimizer = torch.optim.AdamW(list(gates.values()), lr=settings.learning_rate, weight_decay=0.0)
    data = TokenizedExamples(llm, examples, settings.max_length)
    plan = batch_order(len(examples), settings.steps, settings.batch_size, settings.seed, data.lengths)

    def step_loss(step: int) -> StepResult:
        with training_autocast(llm, settings.precision):
            return StepResult(batch_loss(llm, llm.model, data.batch(plan[step])), len(plan[step]), data.tokens(plan[step]))

    llm.model.eval()
    loop = TrainingLoop(settings.steps, 0.1, eval_every=settings.steps, checkpoint_every=settings.steps)
    with gated_lora(llm.model, lora, {path: gates[_key(path)] for path in lora.modules}):
        state, _ = loop.run(gates, optimizer, step_loss, progress=progress, stage=stage)
    trained = {path: gates[_key(path)].detach().cpu().clone() for path in lora.modules}
    return TrainedGates(trained, round(state.seconds, 3), state.curve, state.tokens)


@torch.inference_mode()
def mean_gates(llm: LLM, modules: list[str], examples: list[Example], settings: GateSettings) -> TrainedGates:
    """Per module, the mean direction of its inputs at the answer tokens of `examples`, read as
    assembly reads a target's history (whole examples, the scored positions), through the LLM as
    loaded (the pool's base, no piece)."""
    from recipes.methods.perpcs.assembly import read_history

    settings.validate()
    if not examples:
        raise PersonaError("no examples to make the gates from")
    started = time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0.0)
    masks: dict[int, torch.Tensor] = {}

    def accumulate(path: str):
        def hook(_: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            x, mask = inputs[0], masks[inputs[0].shape[1]].float()
            directions = torch.nn.functional.normalize(x.float(), dim=-1) * mask[..., None]
            sums[path] = sums.get(path, 0.0) + directions.sum((0, 1))
            counts[path] += float(mask.sum())
            return output

        return hook

    def next_batch(scored: dict[int, torch.Tensor]) -> None:
        masks.clear()
        masks.update(scored)

    with forward_hooks(llm.model, {path: accumulate(path) for path in modules}):
        tokens = read_history(llm, examples, settings.batch_size, settings.max_length, settings.precision, next_batch)
    width = {path: llm.model.get_submodule(path).weight.shape[1] for path in modules}
    gates = {path: (sums[path] / counts[path]).cpu() if counts[path] else torch.zeros(width[path]) for path in modules}  # no answer tokens: a zero gate
    return TrainedGates(gates, round(time.perf_counter() - started, 3), [], tokens)


def _key(path: str) -> str:
    """A module path as a ParameterDict key (which may not contain dots)."""
    return path.replace(".", "/")
