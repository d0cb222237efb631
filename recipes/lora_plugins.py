"""LoRA plug-ins between the store and a loaded LLM: base chains, serving plans, export and import.

A plug-in may be trained on top of another (`base`), e.g. a user's OPPU LoRA on the task LoRA.
Serving merges the whole base chain into the loaded LLM's weights once and gives each prompt
its own per-user adapter through RowLora; exporting folds the chain into one peft adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from recipes import PersonaError
from recipes.adapters import LoraWeights, combine, export_peft, merge_into, read_peft_folder
from recipes.backbones import LLM
from recipes.row_lora import RowLora
from recipes.tasks import Task
from store import Plugin, Store

TASK_LORA, OPPU = "task-lora", "oppu"
LORA_KINDS = (TASK_LORA, OPPU, "lora")
TRAINED_METHODS = (TASK_LORA, OPPU)


def task_lora_name(task: Task) -> str:
    """The default name of a task's adapted base."""
    return f"{TASK_LORA}-{task.name}"


def oppu_group(task: Task) -> str:
    """The default name prefix of a task's per-user OPPU adapters."""
    return f"{OPPU}-{task.name}"


def oppu_name(group: str, user_id: str) -> str:
    return f"{group}/{user_id}"


def lora_weights(plugin: Plugin) -> LoraWeights:
    if plugin.kind not in LORA_KINDS:
        raise PersonaError(f"plug-in '{plugin.name}' is a {plugin.kind}, not a LoRA adapter")
    return LoraWeights.from_bytes(plugin.weights)


def base_chain(store: Store, name: Optional[str]) -> list[Plugin]:
    """The plug-in `name` and every base under it, the bottom one first (empty for None)."""
    chain: list[Plugin] = []
    while name:
        if any(p.name == name for p in chain):
            raise PersonaError(f"plug-in '{name}' is its own base")
        plugin = store.get_plugin(name)
        chain.insert(0, plugin)
        name = plugin.base
    return chain


def check_llm(plugins: list[Plugin], llm_id: str) -> None:
    """Plug-ins only work with the LLM they were trained for."""
    for plugin in plugins:
        if plugin.llm != llm_id:
            raise PersonaError(f"plug-in '{plugin.name}' was made for LLM '{plugin.llm}', not '{llm_id}' (pass --llm {plugin.llm})")


def apply_chain(llm: LLM, chain: list[Plugin]) -> None:
    """Merge a base chain into the loaded LLM's weights (changes this loaded copy only)."""
    check_llm(chain, llm.id)
    for plugin in chain:
        merge_into(llm.model, lora_weights(plugin))


# ---------- serving a method ----------


@dataclass
class ServingPlan:
    """What the LLM needs for a method, read from the store before any model is loaded:
    a chain merged into the weights for every prompt, and per-prompt adapters (OPPU)."""

    chain: list[Plugin] = field(default_factory=list)
    per_prompt: Optional[list[Plugin]] = None

    def facts(self) -> dict:
        facts: dict = {"plugins": [p.name for p in self.chain]}
        if self.per_prompt is not None:
            facts["per_user_adapters"] = len({p.name for p in self.per_prompt})
        return facts

    def apply(self, llm: LLM) -> Optional[RowLora]:
        """Merge the chain into `llm` and return the per-prompt adapters (None when there are none)."""
        apply_chain(llm, self.chain)
        if self.per_prompt is None:
            return None
        check_llm(self.per_prompt, llm.id)
        weights = {p.name: lora_weights(p) for p in self.per_prompt}
        return RowLora(llm.model, [weights[p.name] for p in self.per_prompt])


def plan_serving(
    store: Store, task: Task, method: str, user_ids: list[str], plugin: Optional[str] = None, base: Optional[str] = None
) -> ServingPlan:
    """The plug-ins a method runs with for prompts of these users (one user id per prompt).

    task-lora: the task LoRA `plugin` (default task-lora-TASK) with its bases. oppu: each user's
    adapter `plugin/USER` (default group oppu-TASK) over their common base. Prompt methods run on
    `base` when one is named."""
    if method == TASK_LORA:
        if base:
            raise PersonaError("--base goes with prompt methods; task-lora is a base itself (use --plugin NAME)")
        return ServingPlan(chain=base_chain(store, plugin or task_lora_name(task)))
    if method == OPPU:
        if base:
            raise PersonaError("--base: an OPPU adapter runs on the base it was trained on; drop --base")
        return _oppu_plan(store, task, user_ids, plugin or oppu_group(task))
    if plugin:
        raise PersonaError(f"--plugin goes with --method task-lora or oppu, not {method} (use --base NAME)")
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
    per_prompt = [found[oppu_name(group, u)] for u in user_ids]
    return ServingPlan(chain=base_chain(store, bases.pop()), per_prompt=per_prompt)


# ---------- export and import ----------


def export_plugin(store: Store, name: str, directory: str | Path) -> dict:
    """Write a stored LoRA plug-in, with its whole base chain folded in, as one peft adapter folder
    for the bare LLM: `PeftModel.from_pretrained(llm, directory)` then gives the same outputs."""
    chain = base_chain(store, name)
    weights = combine([lora_weights(p) for p in chain])
    plugin = chain[-1]
    is_seq2seq = bool(plugin.config.get("seq2seq", False))
    path = export_peft(weights, plugin.llm, directory, is_seq2seq)
    return {
        "name": name, "directory": str(path), "llm": plugin.llm, "folded_bases": [p.name for p in chain[:-1]],
        "rank": max(weights.ranks.values()), "modules": len(weights.modules),
    }  # fmt: skip


def import_plugin(
    store: Store, llm: LLM, directory: str | Path, name: str, kind: str = "lora", task: Optional[str] = None,
    user_id: Optional[str] = None, replace: bool = False,
) -> Plugin:  # fmt: skip
    """Store a peft LoRA folder as a plug-in of the loaded LLM (checked by loading it with peft)."""
    if kind not in LORA_KINDS:
        raise PersonaError(f"--kind {kind}: expected one of {', '.join(LORA_KINDS)}")
    if kind == OPPU and not user_id:
        raise PersonaError("--kind oppu needs --user (whose adapter it is)")
    if not replace and store.get_plugins([name]):
        raise PersonaError(f"plug-in '{name}' exists; pass --replace to overwrite it")
    weights, config = read_peft_folder(directory, llm.model)
    plugin = Plugin(
        name=name, kind=kind, llm=llm.id, weights=weights.to_bytes(), task=task, user_id=user_id,
        config={"imported_from": str(Path(directory).resolve()), "peft": config, "seq2seq": llm.is_seq2seq},
        metrics={"adapter_bytes": len(weights.to_bytes()), "modules": len(weights.modules)},
    )  # fmt: skip
    store.put_plugins([plugin])
    return plugin
