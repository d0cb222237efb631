"""Which plug-ins and per-user adapters a method runs with: the serving plan, read from the store
before any model loads, then applied to the loaded LLM.

Methods: prompt methods (none, random, rag, pag) on the bare LLM or a `base`; task-lora; and the
per-user adapter methods oppu, perpcs (assembled from the piece pool) and peft-retrieval (whole
sharer adapters of the most similar sharers); and pplug (a trained embedder's soft tokens from
the user's history). Each per-user method runs alone (k=0 prompt) or with a prompt method, e.g.
perpcs+rag or pplug+rag. Every prompt of a batch gets its own user's adapter through RowLora, or
its own soft tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from recipes.kit.soft_prompts import SoftTokens

from recipes import PersonaError
from recipes.kit.lora import LoraWeights
from recipes.methods.perpcs.assembly import retrieval_choices, user_embedding
from recipes.kit.backbones import LLM
from recipes.kit.plugins import OPPU, TASK_LORA, apply_chain, base_chain, lora_weights, oppu_group, oppu_name, task_lora_name
from recipes.methods.pplug.training import PPLUG, get_pplug, query_soft_tokens, require_histories, check_encoder as check_pplug_encoder, history_vectors
from recipes.methods.perpcs.pool import Pool, decode_choices, load_pool, mixed_lora, pool_label, read_pool
from recipes.kit.prompts import PROMPT_METHODS
from recipes.kit.row_lora import RowLora
from recipes.kit.tasks import Task
from store import Plugin, Query, Store

PERPCS, PEFT_RETRIEVAL = "perpcs", "peft-retrieval"
UNIFORM = "uniform"  # the one adapter of Per-Pcs's uniform-gates ablation
USER_ADAPTER_METHODS = (OPPU, PERPCS, PEFT_RETRIEVAL, PPLUG)
ADAPTER_METHODS = (TASK_LORA, *USER_ADAPTER_METHODS)
PLUGIN_METHODS = (TASK_LORA, OPPU, PPLUG)
ABLATIONS = {
    OPPU: "the task base of the OPPU adapters",
    PERPCS: "uniform gates: every sharer's pieces, equal weights",
    PPLUG: "another user's history (seeded derangement)",
}


def split_method(method: str) -> tuple[Optional[str], str]:
    """(adapter method or None, prompt method): 'perpcs+rag' -> ('perpcs', 'rag'), 'oppu' -> ('oppu', 'none')."""
    adapter, plus, prompt = method.partition("+")
    if adapter in PROMPT_METHODS and not plus:
        return None, adapter
    if adapter in ADAPTER_METHODS and (not plus or (adapter in USER_ADAPTER_METHODS and prompt in PROMPT_METHODS)):
        return adapter, prompt or "none"
    combos = ", ".join(f"{a}+rag" for a in USER_ADAPTER_METHODS)
    raise PersonaError(f"--method {method}: expected one of {', '.join(PROMPT_METHODS + ADAPTER_METHODS)} or {combos} (any prompt method after +)")


@dataclass
class ServingPlan:
    """What the LLM needs for a method, read from the store before any model is loaded: a chain
    merged into the weights for every prompt, and per-prompt adapters (OPPU, Per-Pcs, ...):
    `per_prompt[i]` names prompt i's adapter in `adapters`, made for LLM `adapter_llm`; or
    per-query soft tokens (PPlug), made once the LLM is loaded."""

    chain: list[Plugin] = field(default_factory=list)
    per_prompt: Optional[list[str]] = None
    adapters: Callable[[], dict[str, LoraWeights]] = dict
    adapter_llm: Optional[str] = None
    details: dict = field(default_factory=dict)
    soft: Optional[Callable[[LLM, list[Query]], SoftTokens]] = None

    def facts(self) -> dict:
        facts: dict = {"plugins": [p.name for p in self.chain], **self.details}
        if self.per_prompt is not None:
            facts["per_user_adapters"] = len(set(self.per_prompt))
        return facts

    def apply(self, llm: LLM) -> Optional[RowLora]:
        """Merge the chain into `llm` and return the per-prompt adapters (None when there are none)."""
        apply_chain(llm, self.chain)
        if self.per_prompt is None:
            return None
        if self.adapter_llm != llm.id:
            raise PersonaError(f"the per-user adapters were made for LLM '{self.adapter_llm}', not '{llm.id}' (pass --llm {self.adapter_llm})")
        adapters = self.adapters()
        return RowLora(llm.model, [adapters[key] for key in self.per_prompt])

    def soft_tokens(self, llm: LLM, queries: list[Query]) -> Optional[SoftTokens]:
        """Each query's soft tokens (None for methods without them)."""
        return None if self.soft is None else self.soft(llm, queries)


def plan_serving(
    store: Store,
    task: Task,
    method: str,
    user_ids: list[str],
    plugin: Optional[str] = None,
    base: Optional[str] = None,
    pool: Optional[str] = None,
    top_k: Optional[int] = None,
    ablation: bool = False,
    seed: int = 0,
) -> ServingPlan:
    """The plug-ins a method runs with for prompts of these users (one user id per prompt).

    task-lora: the task LoRA `plugin` (default task-lora-TASK) with its bases. oppu: each user's
    adapter `plugin/USER` (default group oppu-TASK) over their common base. perpcs: each user's
    stored assembly against `pool` (a tag or version; default the newest). peft-retrieval: the
    `top_k` (default 3) sharers of `pool` closest to each user. Prompt methods run on `base`.

    `ablation` serves a personal method's non-personal counterpart, everything else equal, so the
    difference between the two is what personalization adds: oppu -> the task base its adapters
    were trained on; perpcs -> every sharer's pieces with equal weight (uniform gates, the same
    adapter for every user); pplug -> each user's soft token made from another user's history
    (a seeded derangement of the users served)."""
    adapter, _ = split_method(method)
    if ablation and adapter not in ABLATIONS:
        raise PersonaError(f"--ablation goes with a personal method ({', '.join(ABLATIONS)}), not {method}")
    if adapter is not None and base:
        raise PersonaError(f"--base goes with prompt methods; {adapter} runs on the base its adapters were made on")
    if pool is not None and adapter not in (PERPCS, PEFT_RETRIEVAL):
        raise PersonaError("--pool goes with --method perpcs or peft-retrieval")
    if plugin and adapter not in PLUGIN_METHODS:
        raise PersonaError(f"--plugin goes with --method task-lora, oppu or pplug, not {method} (use --base NAME)")
    if top_k is not None and top_k < 1:
        raise PersonaError(f"--top-k must be at least 1, got {top_k}")
    if adapter == TASK_LORA:
        return ServingPlan(chain=base_chain(store, plugin or task_lora_name(task)))
    if adapter == OPPU:
        plan = _oppu_plan(store, task, user_ids, plugin or oppu_group(task))
        if ablation:
            return ServingPlan(chain=plan.chain, details={"ablation": ABLATIONS[OPPU]})
        return plan
    if adapter == PERPCS and ablation:
        return _uniform_plan(store, task, user_ids, pool)
    if adapter == PERPCS:
        return _perpcs_plan(store, task, user_ids, pool, top_k)
    if adapter == PEFT_RETRIEVAL:
        return _retrieval_plan(store, task, user_ids, pool, top_k or 3)
    if adapter == PPLUG:
        return _pplug_plan(store, task, user_ids, plugin or f"{PPLUG}-{task.name}", donors(user_ids, seed) if ablation else None)
    return ServingPlan(chain=base_chain(store, base))


def _oppu_plan(store: Store, task: Task, user_ids: list[str], group: str) -> ServingPlan:
    wanted = sorted(set(user_ids))
    found = store.get_plugins([oppu_name(group, u) for u in wanted])
    missing = [u for u in wanted if oppu_name(group, u) not in found]
    if missing:
        raise PersonaError(
            f"{len(missing)} of {len(wanted)} users have no OPPU adapter '{oppu_name(group, missing[0])}'"
            f" (train them with `persona train-oppu --task {task.name}`)"
        )
    bases = {p.base for p in found.values()}
    if len(bases) > 1:
        raise PersonaError(f"the OPPU adapters of group '{group}' sit on different bases ({', '.join(map(str, sorted(bases, key=str)))})")
    llms = {p.llm for p in found.values()}
    return ServingPlan(
        chain=base_chain(store, bases.pop()), per_prompt=[oppu_name(group, u) for u in user_ids],
        adapters=lambda: {name: lora_weights(p) for name, p in found.items()}, adapter_llm=llms.pop() if len(llms) == 1 else None,
    )  # fmt: skip




def _pool_plan(store: Store, pool: Pool, user_ids: list[str], choose: Callable[[], dict], details: dict) -> ServingPlan:
    return ServingPlan(
        chain=base_chain(store, pool.base), per_prompt=list(user_ids), adapter_llm=pool.llm,
        adapters=lambda: {user: mixed_lora(pool, choices) for user, choices in choose().items()},
        details={"pool": pool.label, "pool_version": pool.version, **details},
    )  # fmt: skip


def _perpcs_plan(store: Store, task: Task, user_ids: list[str], ref: Optional[str], top_k: Optional[int]) -> ServingPlan:
    version = store.resolve_pool(ref)
    label = pool_label(version)
    wanted = sorted(set(user_ids))
    records = store.get_assemblies(task.name, wanted, version.version)
    missing = [u for u in wanted if u not in records]
    if missing:
        raise PersonaError(
            f"{len(missing)} of {len(wanted)} users have no assembly against pool {label}, e.g. user '{missing[0]}'"
            f" (run `persona assemble --task {task.name} --pool {label} --user {missing[0]}`, or --split/--users for many)"
        )
    ks = {r.top_k for r in records.values()}
    if top_k is not None and ks != {top_k}:
        raise PersonaError(f"the stored assemblies use top-k {sorted(ks)}; assemble again with --top-k {top_k}")
    pool = read_pool(store, task.name, version)
    choose = lambda: {u: decode_choices(pool, r.choice) for u, r in records.items()}  # noqa: E731
    return _pool_plan(store, pool, user_ids, choose, {"top_k": sorted(ks)})


def _uniform_plan(store: Store, task: Task, user_ids: list[str], ref: Optional[str]) -> ServingPlan:
    """Per-Pcs with uniform gates: one adapter mixing all sharers' pieces equally, for every user."""
    pool = load_pool(store, task.name, ref)
    choose = lambda: {UNIFORM: {path: [(s, 1 / len(m.sharers)) for s in m.sharers] for path, m in pool.modules.items()}}  # noqa: E731
    return _pool_plan(store, pool, [UNIFORM] * len(user_ids), choose, {"ablation": ABLATIONS[PERPCS]})


def donors(user_ids: list[str], seed: int) -> dict[str, str]:
    """Each user's donor: another user of the set, every user donating once (a seeded derangement)."""
    users = sorted(set(user_ids))
    if len(users) < 2:
        raise PersonaError("--ablation of pplug serves each user with another user's history; it needs at least 2 users")
    random.Random(seed).shuffle(users)
    return {user: users[(i + 1) % len(users)] for i, user in enumerate(users)}


def _retrieval_plan(store: Store, task: Task, user_ids: list[str], ref: Optional[str], top_k: int) -> ServingPlan:
    pool = load_pool(store, task.name, ref)
    histories = store.histories(sorted(set(user_ids) | set(pool.sharers)), task.name, with_vectors=True)
    embeddings = {u: user_embedding([item.vector for item in items]) for u, items in histories.items()}
    missing = [u for u in user_ids if u not in embeddings]
    if missing:
        raise PersonaError(f"user '{missing[0]}' has no {task.name} history to compare with the sharers")
    sharers = {s: embeddings[s] for s in pool.sharers if s in embeddings}
    choose = lambda: {u: retrieval_choices(pool, embeddings[u], sharers, top_k) for u in set(user_ids)}  # noqa: E731
    return _pool_plan(store, pool, user_ids, choose, {"top_k": top_k})


def _pplug_plan(store: Store, task: Task, user_ids: list[str], name: str, donor: Optional[dict[str, str]] = None) -> ServingPlan:
    plugin = get_pplug(store, name)
    check_pplug_encoder(store, plugin.encoder)
    if plugin.task not in (None, task.name):
        raise PersonaError(f"plug-in '{name}' was trained for {plugin.task}, not {task.name}")
    if plugin.config["shape"].get("personal", True):
        require_histories(history_vectors(store, task, user_ids, 1), user_ids, task)
    if donor is not None and not plugin.config["shape"].get("personal", True):
        raise PersonaError(f"plug-in '{name}' has no personal token; it is an ablation already")
    details = {"pplug": name, "pooling": plugin.config["shape"]["pooling"]}
    if donor is not None:
        details["ablation"] = ABLATIONS[PPLUG]
    return ServingPlan(
        chain=base_chain(store, plugin.base), details=details,
        soft=lambda llm, queries: query_soft_tokens(store, plugin, llm, task, queries, donor),
    )  # fmt: skip
