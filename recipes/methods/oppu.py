"""OPPU (One PEFT Per User): one LoRA per user, trained on that user's history only, on top of a
task base; served to each prompt of a mixed batch through that prompt's user's adapter.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from recipes import PersonaError
from recipes.kit.backbones import LLM, loaded
from recipes.kit.plugins import apply_chain, base_chain, chain_key, lora_plugin_config, lora_weights, training_metrics
from recipes.kit.serving_plan import ServingPlan, per_prompt_loras
from recipes.kit.training_loop import LoraSettings, settings_key, train_lora
from recipes.kit.progress import Progress, report
from recipes.kit.tasks import Task
from recipes.kit.history_pairs import check_recipe, paired_histories
from recipes.kit.training_data import checkpoint_path, history_examples
from recipes.methods.registry import Method, MethodOptions, register
from store import Plugin, Store

OPPU = "oppu"


def oppu_group(task: Task) -> str:
    """The default name prefix of a task's per-user OPPU adapters."""
    return f"{OPPU}-{task.name}"


def oppu_name(group: str, user_id: str) -> str:
    return f"{group}/{user_id}"


@dataclass
class OppuReport:
    group: str
    base: Optional[str]
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    stale: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    train_seconds: list[float] = field(default_factory=list)
    adapter_bytes: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "group": self.group, "base": self.base, "trained": len(self.trained), "reused": len(self.reused),
            "resumed": len(self.resumed), "stale": self.stale,
            "skipped": self.skipped,
            "mean_train_seconds": round(statistics.fmean(self.train_seconds), 3) if self.train_seconds else None,
            "mean_adapter_bytes": round(statistics.fmean(self.adapter_bytes)) if self.adapter_bytes else None,
        }  # fmt: skip


def train_oppu(
    store: Store,
    llm: LLM | Callable[[], LLM],
    task: Task,
    user_ids: list[str],
    settings: LoraSettings,
    group: str,
    base: Optional[str] = None,
    retrain: bool = False,
    progress: Optional[Progress] = None,
    pairs: str = "none",
) -> OppuReport:
    """Train one LoRA per user on that user's history only, on top of `base`, stored as
    `group/USER`, all in one write at the end. A user whose stored adapter was made from the same
    settings, base weights and history is kept. Each finished adapter is staged on disk first, so
    a run that is stopped resumes where it was and the store never holds half a run. `pairs`
    (history_pairs) is how history items become examples: `rules` makes task-format pairs of them."""
    settings.validate()
    check_recipe(pairs)
    if not user_ids:
        raise PersonaError("no users to train")
    store.require_users(user_ids)
    chain = base_chain(store, base)
    llm = loaded(llm)
    report_ = OppuReport(group=group, base=base)
    existing = {p.name: p for p in store.list_plugins(kind=OPPU, prefix=f"{group}/")}
    histories = paired_histories(store, task, store.histories(user_ids, task.name), pairs, settings.seed)
    keys = {user: oppu_key(llm.id, settings, chain, history_examples(task, histories.get(user, []))) for user in user_ids}
    todo = []
    for user in user_ids:
        old = existing.get(oppu_name(group, user))
        if old is not None and old.config.get("key") == keys[user] and not retrain:
            report_.reused.append(user)
            report_.train_seconds.append(old.metrics.get("train_seconds", 0.0))
            report_.adapter_bytes.append(old.size)
            continue
        if old is not None and not retrain:  # a stored adapter that no longer fits: retrained, and said why
            report_.stale[user] = "its settings, base weights or history changed since it was trained"
        todo.append(user)
    if not todo:
        return report_
    staging = OppuStaging(checkpoint_path(store, group).with_suffix(".oppu"))
    apply_chain(llm, chain)
    tick = report(progress)
    finished: list[Plugin] = []
    tick("training OPPU adapters", 0, len(todo))
    for n, user in enumerate(todo, 1):
        examples = history_examples(task, histories.get(user, []))
        plugin = None if retrain or not examples else staging.load(user, keys[user])
        if not examples:
            report_.skipped[user] = f"no {task.name} history"
        elif plugin is not None:
            report_.resumed.append(user)
        else:
            trained = train_lora(llm, examples, settings)
            weights = trained.weights.to_bytes()
            config = {**lora_plugin_config(llm, settings, trained, chain), "settings": settings_key(settings), "examples": len(examples), "key": keys[user]}
            plugin = Plugin(
                name=oppu_name(group, user), kind=OPPU, llm=llm.id, weights=weights, task=task.name, user_id=user,
                base=base, config=config, metrics=training_metrics(trained, len(weights)),
            )  # fmt: skip
            staging.save(plugin)
            report_.trained.append(user)
        if plugin is not None:
            finished.append(plugin)
            report_.train_seconds.append(plugin.metrics.get("train_seconds", 0.0))
            report_.adapter_bytes.append(len(plugin.weights))
        tick("training OPPU adapters", n, len(todo))
    store.put_plugins(finished)
    staging.clear()
    return report_


def oppu_key(llm_id: str, settings: LoraSettings, chain: list[Plugin], examples: list) -> str:
    """What an OPPU adapter depends on, hashed: the LLM, the settings, the base chain's weights (not
    just its names: a replaced base invalidates its adapters) and the user's training examples."""
    key = [llm_id, settings_key(settings), chain_key(chain), [(e.prompt, e.target) for e in examples]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class OppuStaging:
    """Finished adapters of an OPPU run not yet written to the store, one file pair per user:
    the resume point of a stopped run. An adapter is used again only under the same key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _paths(self, user: str) -> tuple[Path, Path]:
        name = hashlib.sha256(user.encode()).hexdigest()[:16]
        return self.folder / f"{name}.json", self.folder / f"{name}.weights"

    def save(self, plugin: Plugin) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta, weights = self._paths(plugin.user_id or "")
        weights.write_bytes(plugin.weights)
        record = {k: v for k, v in asdict(plugin).items() if k not in ("weights", "created_at")}
        partial = meta.with_suffix(".partial")
        partial.write_text(json.dumps(record), encoding="utf-8")
        partial.replace(meta)  # the record appears only once its weights are on disk

    def load(self, user: str, key: str) -> Optional[Plugin]:
        meta, weights = self._paths(user)
        if not meta.exists() or not weights.exists():
            return None
        record = json.loads(meta.read_text(encoding="utf-8"))
        if record.get("user_id") != user or record.get("config", {}).get("key") != key:
            return None
        return Plugin(**record, weights=weights.read_bytes())

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def serve_oppu(store: Store, task: Task, user_ids: list[str], options: MethodOptions) -> ServingPlan:
    """Each prompt through its user's adapter `GROUP/USER` over their common base; the ablation
    serves the base alone."""
    group = options.plugin or oppu_group(task)
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
    chain = base_chain(store, bases.pop())
    if options.ablation:
        return ServingPlan(chain=chain, details={"ablation": ABLATION})
    llms = {p.llm for p in found.values()}
    load = lambda: {name: lora_weights(p) for name, p in found.items()}  # noqa: E731
    return ServingPlan(
        chain=chain, edit=per_prompt_loras([oppu_name(group, u) for u in user_ids], load, llms.pop() if len(llms) == 1 else None),
        details={"per_user_adapters": len(wanted)},
    )


ABLATION = "the task base of the OPPU adapters"
register(Method(
    name=OPPU, summary="each user's own LoRA, trained on their history only, over the task base",
    needs="an OPPU adapter per user (--plugin GROUP, default oppu-TASK)", trained_by="persona train-oppu",
    plan=serve_oppu, options=("plugin",), ablation=ABLATION, personal=True,
))  # fmt: skip
