"""Train the LoRA plug-ins from the store's data: the task LoRA (task adaptation) on training-split
users' queries, and OPPU, one LoRA per user on that user's history only, on top of a base.
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
from recipes.flows.answer import answer_prompts
from recipes.kit.backbones import LLM, loaded
from recipes.kit.plugins import OPPU, TASK_LORA, apply_chain, base_chain, chain_key, oppu_name
from recipes.kit.training_loop import LoraSettings, TrainedLora, settings_key, train_lora
from recipes.kit.progress import Progress, report
from recipes.kit.splits import query_split
from recipes.kit.tasks import Task
from recipes.kit.history_pairs import check_recipe, paired_histories
from recipes.kit.training_data import checkpoint_path, history_examples, query_examples, split_queries, train_user_pairs
from store import Plugin, Query, Store


def _lora_config(llm: LLM, settings: LoraSettings, trained: TrainedLora, chain: list[Plugin]) -> dict:
    lora = {**asdict(settings), "target_modules": trained.target_modules}
    return {"lora": lora, "seq2seq": llm.is_seq2seq, "base_chain": [p.name for p in chain]}


def _training_metrics(trained: TrainedLora, weights_bytes: int) -> dict:
    return {
        "train_seconds": trained.seconds, "steps": trained.steps, "adapter_bytes": weights_bytes,
        "final_loss": trained.curve[-1]["loss"] if trained.curve else None, "best_step": trained.best_step,
        "best_dev_loss": trained.best_dev_loss, "best_dev_score": trained.best_dev_score, "resumed_from": trained.resumed_from,
        "ignored_checkpoint": trained.ignored_checkpoint, "curve": trained.curve,
    }  # fmt: skip


# ---------- task adaptation ----------

SELECTIONS = ("loss", "metric")


def _dev_scorer(llm: LLM, task: Task, dev: list[Query], batch_size: int) -> Callable[[], float]:
    """The task's first metric of the LLM as it is now on the dev queries (sign flipped where lower is better)."""
    metric = task.metric_names[0]
    sign = 1.0 if task.higher_is_better(metric) else -1.0

    def score() -> float:
        mode = "rank" if task.is_classification else "generate"
        raw = answer_prompts(llm, task, mode, [q.input for q in dev], max(batch_size, 16))
        return sign * task.score([task.normalize(r) for r in raw], [q.output for q in dev])[metric]

    return score


def adapt_task(
    store: Store,
    llm: LLM | Callable[[], LLM],
    task: Task,
    settings: LoraSettings,
    name: str,
    base: Optional[str] = None,
    replace: bool = False,
    max_examples: Optional[int] = None,
    progress: Optional[Progress] = None,
    select: str = "loss",
    pairs: str = "none",
) -> Plugin:
    """Train the task LoRA on the training-split users' queries, keep the step that does best on
    the dev-split queries (select 'loss': the lowest dev loss; 'metric': the task's first metric,
    e.g. ROUGE-1, which generates every dev answer at every evaluation), and store it as plug-in
    `name`. With `pairs` (history_pairs) the training users' history items made into task-format
    pairs train too (never one whose output is a held-out query's gold). Test users are never trained on."""
    settings.validate()
    check_recipe(pairs)
    if select not in SELECTIONS:
        raise PersonaError(f"--select {select}: expected one of {', '.join(SELECTIONS)}")
    if not replace and store.get_plugins([name]):
        raise PersonaError(f"plug-in '{name}' exists; pass --replace to train it again")
    train = split_queries(store, task, "train")[:max_examples]
    if not train:
        raise PersonaError(f"store {store.uri} has no {task.name} training-split queries with gold outputs")
    dev = split_queries(store, task, "dev")
    examples = query_examples(train) + train_user_pairs(store, task, sorted({q.user_id for q in train}), pairs, settings.seed)
    chain = base_chain(store, base)
    llm = loaded(llm)
    apply_chain(llm, chain)
    scorer = _dev_scorer(llm, task, dev, settings.batch_size) if dev and select == "metric" else None
    trained = train_lora(
        llm, examples, settings, query_examples(dev) or None, progress, checkpoint_path(store, name),
        stage=f"training {name}", dev_score=scorer,
    )  # fmt: skip
    weights = trained.weights.to_bytes()
    config = _lora_config(llm, settings, trained, chain)
    config.update(
        train_users=len({q.user_id for q in train}), train_examples=len(examples), train_queries=len(train),
        history_pairs=len(examples) - len(train), pairs=pairs, dev_examples=len(dev),
    )  # fmt: skip
    plugin = Plugin(
        name=name, kind=TASK_LORA, llm=llm.id, weights=weights, task=task.name, base=base,
        config=config, metrics=_training_metrics(trained, len(weights)),
    )  # fmt: skip
    store.put_plugins([plugin])
    return plugin


# ---------- OPPU: one LoRA per user ----------


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
            config = {**_lora_config(llm, settings, trained, chain), "settings": settings_key(settings), "examples": len(examples), "key": keys[user]}
            plugin = Plugin(
                name=oppu_name(group, user), kind=OPPU, llm=llm.id, weights=weights, task=task.name, user_id=user,
                base=base, config=config, metrics=_training_metrics(trained, len(weights)),
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


def split_users(store: Store, task: Task, split: str) -> list[str]:
    """Users with queries of `task` in a split of the fixed user-level split ('all' for every user
    with queries), in natural id order."""
    from store import id_sort_key

    users = {q.user_id for q in store.task_queries(task.name) if split == "all" or query_split(q.split, q.user_id) == split}
    if not users:
        raise PersonaError(f"store {store.uri} has no {task.name} users in split '{split}'")
    return sorted(users, key=id_sort_key)
