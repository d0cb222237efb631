"""StyleVector (Zhang et al. 2025): a user's style as one direction in the LLM's hidden states,
added at one layer while generating. Nothing is trained; a few KB per user.

For each of the user's most recent history items made a task-format pair (prompt, the user's
own text), the LLM's own greedy answer to the same prompt is the neutral reference. The style
vector is the mean over items of (mean hidden state at `layer` over the user's answer tokens) -
(the same over the neutral answer's tokens). Serving adds `alpha` x the vector to that layer's
output at every position of the prompt's row, so each prompt of a mixed batch is steered by
its own user's vector.

The vectors are cached in the store as per-user plug-ins (kind style-vector, `style-vector-TASK/USER`),
made again whenever the LLM (with its merged plug-ins), the layer or the user's items change.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from recipes import PersonaError
from recipes.kit.backbones import LLM
from recipes.kit.generation import generate
from recipes.kit.history_pairs import PAIR_RECIPES, paired_histories
from recipes.kit.hooks import Hook, forward_hooks
from recipes.kit.plugins import base_chain
from recipes.kit.row_edits import RowEdit, rows_of
from recipes.kit.serving_plan import ServingPlan
from recipes.kit.tasks import Task
from recipes.kit.training_data import history_examples
from recipes.kit.training_loop import IGNORE, Example, causal_batch, encode_example
from recipes.methods.registry import Method, MethodOptions, Setting, register
from store import Plugin, Query, Store

KIND = "style-vector"
MAX_LENGTH = 256
BATCH = 16


def _recipe(value: str) -> str:
    if value not in PAIR_RECIPES:
        raise ValueError(f"expected one of {', '.join(PAIR_RECIPES)}")
    return value


SETTINGS = {
    "layer": Setting(-1, int, "the decoder layer steered (0 = first; -1: the middle one)"),
    "alpha": Setting(1.0, float, "how far along the style vector each hidden state moves"),
    "items": Setting(8, int, "history items a user's vector is made from (the most recent)"),
    "pairs": Setting("rules", _recipe, "how history items become (prompt, user text) pairs: rules or none"),
}


def decoder_layers(llm: LLM) -> list[str]:
    """Module paths of the LLM's decoder layers, first to last."""
    for name, module in llm.model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and "encoder" not in name:
            return [f"{name}.{i}" for i in range(len(module))]
    raise PersonaError(f"LLM '{llm.id}' has no decoder layer list to steer")


def steered_layer(llm: LLM, layer: int) -> str:
    layers = decoder_layers(llm)
    index = len(layers) // 2 if layer == -1 else layer
    if not 0 <= index < len(layers):
        raise PersonaError(f"--set layer={layer}: LLM '{llm.id}' has layers 0 to {len(layers) - 1} (or -1 for the middle)")
    return layers[index]


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def answer_states(llm: LLM, path: str, examples: list[Example]) -> torch.Tensor:
    """(examples, d): the mean output of layer `path` over each example's answer tokens (its end token left out)."""
    captured: list[torch.Tensor] = []
    hook: Hook = lambda module, inputs, output: captured.append(_hidden(output))  # noqa: E731
    rows: list[torch.Tensor] = []
    eos = llm.tokenizer.eos_token_id
    with forward_hooks(llm.model, {path: hook}):
        for start in range(0, len(examples), BATCH):
            batch = causal_batch(llm, [encode_example(llm, e, MAX_LENGTH) for e in examples[start : start + BATCH]], share_prefix=False)
            labels = batch.pop("labels")
            captured.clear()
            llm.model(**batch, use_cache=False)
            answer = ((labels != IGNORE) & (labels != eos)).float()
            hidden = captured[0].float()
            rows.append((hidden * answer[..., None]).sum(1) / answer.sum(1, keepdim=True).clamp(min=1))
    return torch.cat(rows).cpu()


def style_vectors(llm: LLM, task: Task, path: str, examples: dict[str, list[Example]]) -> dict[str, torch.Tensor]:
    """Each user's style vector at layer `path` from their (prompt, own answer) examples."""
    order = [(user, e) for user, items in examples.items() for e in items]
    if not order:
        return {}
    neutral = generate(llm, [e.prompt for _, e in order], task.max_new_tokens, BATCH, MAX_LENGTH, stage="neutral answers")
    kept = [n for n, text in enumerate(neutral) if text.strip()]  # an empty neutral answer has no tokens to compare
    order, neutral = [order[n] for n in kept], [neutral[n] for n in kept]
    if not order:
        raise PersonaError("the LLM answered none of the users' history prompts; no style vector can be made")
    own = answer_states(llm, path, [e for _, e in order])
    reference = answer_states(llm, path, [Example(e.prompt, text) for (_, e), text in zip(order, neutral)])
    differences: dict[str, list[torch.Tensor]] = {}
    for (user, _), mine, theirs in zip(order, own, reference):
        differences.setdefault(user, []).append(mine - theirs)
    return {user: torch.stack(rows).mean(0) for user, rows in differences.items()}  # a user with no answered item has none


class RowSteering(RowEdit):
    """Adds prompt i's vector to every position of its row at one layer's output."""

    def __init__(self, model: torch.nn.Module, path: str, vectors: torch.Tensor) -> None:
        super().__init__(model)
        self.path = path
        weight = next(model.parameters())
        self.vectors = vectors.to(weight.device, weight.dtype)

    def stack(self, prompts: list[int]) -> torch.Tensor:
        return self.vectors[prompts]

    def select(self, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return state[index]

    def concat(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.cat([first, second])

    def repeat(self, state: torch.Tensor, times: int) -> torch.Tensor:
        return state.repeat_interleave(times, 0)

    def hooks(self) -> dict[str, Hook]:
        def steer(module: torch.nn.Module, inputs: tuple, output: object) -> object:
            if self.current is None:
                return output
            hidden = _hidden(output)
            steered = hidden + rows_of(hidden, self.current)[:, None, :]
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return {self.path: steer}


def _name(task: Task, user: str) -> str:
    return f"{KIND}-{task.name}/{user}"


def _key(llm: LLM, path: str, examples: list[Example]) -> str:
    return hashlib.sha256(json.dumps([llm.state_id, path, [(e.prompt, e.target) for e in examples]]).encode()).hexdigest()[:24]


def cached_vectors(store: Store, llm: LLM, task: Task, path: str, examples: dict[str, list[Example]]) -> dict[str, torch.Tensor]:
    """Every user's vector: the stored one while its key holds, else made now and stored."""
    stored = store.get_plugins([_name(task, u) for u in examples])
    keys = {u: _key(llm, path, items) for u, items in examples.items()}
    vectors = {
        u: load_tensors(p.weights)["vector"] for u in examples
        if (p := stored.get(_name(task, u))) is not None and p.config.get("key") == keys[u]
    }  # fmt: skip
    todo = {u: items for u, items in examples.items() if u not in vectors}
    made = style_vectors(llm, task, path, todo)
    store.put_plugins([
        Plugin(name=_name(task, u), kind=KIND, llm=llm.id, weights=save_tensors({"vector": v.contiguous()}), task=task.name, user_id=u,
               config={"key": keys[u], "layer": path, "items": len(todo[u])})
        for u, v in made.items()
    ])  # fmt: skip
    return {**vectors, **made}


def serve_style_vector(store: Store, task: Task, user_ids: list[str], options: MethodOptions) -> ServingPlan:
    layer, alpha, items, pairs = (options.setting(k) for k in ("layer", "alpha", "items", "pairs"))
    if items < 1:
        raise PersonaError(f"--set items={items}: must be at least 1")
    histories = store.histories(sorted(set(user_ids)), task.name)
    without = [u for u in dict.fromkeys(user_ids) if not histories.get(u)]
    if without:
        raise PersonaError(f"user '{without[0]}' has no {task.name} history to take a style from")

    def edit(llm: LLM, queries: list[Query]) -> RowEdit:
        if llm.is_seq2seq:
            raise PersonaError(f"style-vector steers a causal LLM's decoder layers; '{llm.id}' is a seq2seq model")
        path = steered_layer(llm, layer)
        paired = paired_histories(store, task, {u: h[-items:] for u, h in histories.items()}, pairs, options.seed)
        examples = {u: [e for e in history_examples(task, h) if e.prompt is not None] for u, h in paired.items()}
        missing = [u for u in dict.fromkeys(user_ids) if not examples.get(u)]
        if missing:
            hint = " (try --set pairs=rules)" if pairs == "none" else ""
            raise PersonaError(f"user '{missing[0]}' has no {task.name} history item with an input to take a style from{hint}")
        vectors = cached_vectors(store, llm, task, path, examples)
        missing = [q.user_id for q in queries if q.user_id not in vectors]
        if missing:
            raise PersonaError(f"the LLM gave no neutral answer to any history prompt of user '{missing[0]}'; no style vector")
        if options.ablation:
            vectors = dict.fromkeys(vectors, torch.stack(list(vectors.values())).mean(0))
        return RowSteering(llm.model, path, alpha * torch.stack([vectors[q.user_id] for q in queries]))

    details = {"steered_users": len(histories), **({"ablation": ABLATION} if options.ablation else {})}
    return ServingPlan(chain=base_chain(store, options.plugin), edit=edit, details=details)


ABLATION = "every user steered by the mean style vector of the users served"


register(Method(
    name="style-vector", summary="each user's style direction in the hidden states (own answers minus the LLM's), added at one layer",
    needs="the users' histories (vectors cached per user); --plugin: a base to steer on, e.g. task-lora-LaMP-7", plan=serve_style_vector, options=("plugin",), settings=SETTINGS,
    ablation=ABLATION, personal=True,
))  # fmt: skip
