"""LoRA plug-ins between the store and a loaded LLM: base chains, serving plans, export and import.

A plug-in may be trained on top of another (`base`), e.g. a user's OPPU LoRA on the task LoRA.
Serving (recipes.flows.serve) merges the whole base chain into the loaded LLM's weights once;
exporting folds the chain into one peft adapter.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from recipes import PersonaError
from recipes.kit.lora import LoraWeights, check_peft_folder, combine, export_peft, merge_into, read_peft_folder
from recipes.kit.backbones import LLM, loaded
from recipes.kit.training_loop import LoraSettings, TrainedLora

from store import Plugin, Store

LORA_KINDS = ("task-lora", "oppu", "lora")
"""The plug-in kinds whose weights are a LoRA (the kinds the LoRA trainers store)."""


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
    """Merge a base chain into the loaded LLM's weights (changes this loaded copy only); a copy
    that has exactly this chain merged already is left as it is."""
    check_llm(chain, llm.id)
    if chain and llm.merged == tuple(chain_key([plugin]) for plugin in chain):
        return
    for plugin in chain:
        merge_into(llm.model, lora_weights(plugin))
        llm.merged += (chain_key([plugin]),)


def chain_key(chain: list[Plugin]) -> str:
    """A digest of a base chain's names and weights: what anything trained or cached over the
    chain depends on (a base trained again under the same name gets a new key)."""
    digest = hashlib.sha256()
    for plugin in chain:
        digest.update(plugin.name.encode() + b"\0")
        digest.update(plugin.weights)
    return digest.hexdigest()[:24]


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
    store: Store, llm: LLM | Callable[[], LLM], directory: str | Path, name: str, kind: str = "lora", task: Optional[str] = None,
    user_id: Optional[str] = None, replace: bool = False,
) -> Plugin:  # fmt: skip
    """Store a peft LoRA folder as a plug-in of the loaded LLM (checked by loading it with peft)."""
    if kind not in LORA_KINDS:
        raise PersonaError(f"--kind {kind}: expected one of {', '.join(LORA_KINDS)}")
    if kind == "oppu" and not user_id:
        raise PersonaError("--kind oppu needs --user (whose adapter it is)")
    if not replace and store.get_plugins([name]):
        raise PersonaError(f"plug-in '{name}' exists; pass --replace to overwrite it")
    check_peft_folder(directory)
    llm = loaded(llm)
    weights, config = read_peft_folder(directory, llm.model)
    plugin = Plugin(
        name=name, kind=kind, llm=llm.id, weights=weights.to_bytes(), task=task, user_id=user_id,
        config={"imported_from": str(Path(directory).resolve()), "peft": config, "seq2seq": llm.is_seq2seq},
        metrics={"adapter_bytes": len(weights.to_bytes()), "modules": len(weights.modules)},
    )  # fmt: skip
    store.put_plugins([plugin])
    return plugin


def lora_plugin_config(llm: LLM, settings: LoraSettings, trained: TrainedLora, chain: list[Plugin]) -> dict:
    """What a trained LoRA plug-in records of how it was made."""
    lora = {**asdict(settings), "target_modules": trained.target_modules}
    return {"lora": lora, "seq2seq": llm.is_seq2seq, "base_chain": [p.name for p in chain]}


def training_metrics(trained: TrainedLora, weights_bytes: int) -> dict:
    """What a trained LoRA plug-in records of its training."""
    return {
        "train_seconds": trained.seconds, "steps": trained.steps, "adapter_bytes": weights_bytes,
        "final_loss": trained.curve[-1]["loss"] if trained.curve else None, "best_step": trained.best_step,
        "best_dev_loss": trained.best_dev_loss, "best_dev_score": trained.best_dev_score, "resumed_from": trained.resumed_from,
        "ignored_checkpoint": trained.ignored_checkpoint, "curve": trained.curve,
    }  # fmt: skip
