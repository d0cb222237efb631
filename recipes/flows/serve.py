"""Serving a method: the request's method string resolved in the registry, its options checked,
and its serving plan read from the store, all before any model loads.

Every method answers through the same plan (recipes.kit.serving_plan): a chain merged into the
weights, a per-prompt edit and per-prompt soft tokens, so the prompts of one batch may belong
to different users. A prompt method runs on the bare LLM or on a `base` plug-in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from recipes import PersonaError
from recipes.kit.plugins import base_chain
from recipes.kit.prompts import PromptSettings
from recipes.kit.retrieval import donors
from recipes.kit.serving_plan import ServingPlan
from recipes.kit.tasks import Task
from recipes.methods.registry import Method, MethodOptions, default_prompt, method_settings, methods, parse_method
from store import Store

OPTION_FLAGS = {"plugin": "--plugin", "pool": "--pool", "top_k": "--top-k"}


@dataclass
class MethodRequest:
    """A method and everything that configures it: shared by `generate` and evaluation runs."""

    method: str = "none"
    k: int = 1
    retriever: str = "bm25"
    min_similarity: Optional[float] = None
    seed: int = 0
    plugin: Optional[str] = None
    base: Optional[str] = None
    pool: Optional[str] = None
    top_k: Optional[int] = None
    ablation: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    served: tuple[str, ...] = ()
    """Every user served, when the work is cut into parts (see MethodOptions.served)."""

    def methods(self) -> tuple[Optional[Method], Method]:
        """(model method or None, prompt method)."""
        return parse_method(self.method)

    def prompt_settings(self) -> PromptSettings:
        """The prompt method's settings; --ablation is the prompt method's only when no model method is named."""
        model, _ = self.methods()
        settings = PromptSettings(
            k=self.k, retriever=self.retriever, seed=self.seed, ablation=self.ablation and model is None, served=self.served,
            min_similarity=self.min_similarity,
        )
        settings.validate()
        return settings

    def options(self) -> MethodOptions:
        model, prompt = self.methods()
        target = model or prompt
        return MethodOptions(
            plugin=self.plugin, pool=self.pool, top_k=self.top_k, ablation=self.ablation, seed=self.seed,
            settings=method_settings(target, self.settings), served=self.served,
        )  # fmt: skip


def plan_serving(store: Store, task: Task, request: MethodRequest, user_ids: list[str]) -> ServingPlan:
    """The plan of the request's method for prompts of these users (one user id per prompt).

    With `ablation`, a personal method serves its non-personal counterpart, everything else
    equal, so the difference between the two is what personalization adds (see `persona methods`)."""
    model, prompt = request.methods()
    options = request.options()
    takes = set(model.options) if model else set()
    for option, flag in OPTION_FLAGS.items():
        if getattr(request, option) is not None and option not in takes:
            users = [m.name for m in methods() if option in m.options]
            hint = " (use --base NAME)" if option == "plugin" else ""
            raise PersonaError(f"{flag} goes with --method {_either(users)}, not {request.method}{hint}")
    if request.ablation and (prompt if model is None else model).ablation is None:
        personal = ", ".join(m.name for m in methods() if m.ablation)
        raise PersonaError(f"--ablation goes with a personal method ({personal}), not {request.method}")
    if model is not None and request.base:
        raise PersonaError(f"--base goes with prompt methods; {model.name} runs on the base its adapters were made on")
    if request.min_similarity is not None and prompt.name != "rag":
        raise PersonaError(f"--min-similarity goes with --method rag (or MODEL+rag), not {request.method}")
    if request.top_k is not None and request.top_k < 1:
        raise PersonaError(f"--top-k must be at least 1, got {request.top_k}")
    if model is None:
        if request.ablation:
            donors(user_ids, request.seed, prompt.name, request.served)  # refused here, before a model loads, when there is no other user
        return ServingPlan(chain=base_chain(store, request.base))
    return model.plan(store, task, user_ids, options)


def with_donor(store: Store, request: MethodRequest, user_id: str, donor: str) -> MethodRequest:
    """The request's ablation for one user served with `donor`'s history: a one-off comparison
    (the seeded derangement needs at least two users; among exactly these two it is the swap)."""
    if not request.ablation:
        raise PersonaError("--donor goes with --ablation")
    model, prompt = request.methods()
    ablated = model or prompt
    if not ablated.donor_ablation:
        readers = ", ".join(m.name for m in methods() if m.donor_ablation)
        raise PersonaError(f"--donor: the ablation of {ablated.name} reads no other user's history (those that do: {readers})")
    if donor == user_id:
        raise PersonaError(f"--donor {donor}: the donor must be another user")
    if store.get_user(donor) is None:
        raise PersonaError(f"--donor {donor}: no such user in store {store.uri}")
    return replace(request, served=(user_id, donor))


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def method_label(request: MethodRequest) -> str:
    """A short name for tables: 'rag-bm25-k4', 'random-k2', 'pag', 'none', 'oppu', 'none+task-lora-LaMP-7',
    'perpcs[pool-2]+rag-bm25-k1', 'peft-retrieval-k3', 'pplug-ablation'."""
    model, prompt = request.methods()
    options, settings = request.options(), request.prompt_settings()
    label = prompt.tag(options, settings)
    if model is not None:
        name = model.tag(options, settings)
        name += f"[{request.plugin or request.pool}]" if request.plugin or request.pool else ""
        name += "".join(f"-{k}{v}" for k, v in sorted(request.settings.items()))
        name += "-ablation" if request.ablation else ""
        label = name if prompt is default_prompt() else f"{name}+{label}"
    elif request.ablation:
        label += "-ablation"
    return f"{label}+{request.base}" if request.base else label
