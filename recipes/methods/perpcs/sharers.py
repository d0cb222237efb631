"""Per-Pcs sharers: choose a few users, train each one's LoRA and gates, and register all their
pieces as one new version of the piece pool.

Registration is the longest job, so every finished sharer is kept in a staging folder under
the cache until the pool version is written; running the same command again picks up there.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recipes import PersonaError
from recipes.kit.history_pairs import check_recipe, paired_histories
from recipes.kit.training_data import history_examples
from recipes.kit.lora import LoraWeights
from recipes.kit.retrieval import user_embedding
from recipes.kit.backbones import LLM, cache_dir, loaded
from recipes.kit.engine import LOCAL, Engine, fan_out
from recipes.methods.perpcs.gates import GateSettings, mean_gates, train_gates
from recipes.kit.plugins import apply_chain, base_chain, chain_key
from recipes.kit.training_loop import LoraSettings, train_lora
from recipes.methods.perpcs.pool import gate_kind_of, layer_of, piece_tensors
from recipes.kit.progress import Progress
from recipes.kit.splits import SPLITS, query_split, user_split
from recipes.kit.tasks import Task
from store import Behavior, Piece, Store, id_sort_key
from store.pieces import check_tag

STRATEGIES = ("history-cluster", "most-active", "random")


# ---------- selection ----------


def candidate_histories(store: Store, task: Task, splits: list[str]) -> dict[str, list[Behavior]]:
    """Histories (with vectors) of the users who may share: those of the allowed splits. Test
    users never share; a user's split is that of their queries, else of their id."""
    if "test" in splits:
        raise PersonaError("test users never become sharers; choose from train and dev")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise PersonaError(f"--candidates {','.join(splits)}: expected train, dev or both")
    users = [u.user_id for u in store.list_users()]
    splits_of = user_splits(store, task, users)
    allowed = [u for u in users if splits_of[u] <= set(splits)]
    histories = store.histories(allowed, task.name, with_vectors=True)
    if not histories:
        raise PersonaError(f"store {store.uri} has no {task.name} users of split {' or '.join(splits)} with a history")
    return histories


def user_splits(store: Store, task: Task, users: list[str]) -> dict[str, set[str]]:
    """The splits of each user's queries of `task` (the split of their id when they have none)."""
    found: dict[str, set[str]] = {}
    wanted = set(users)
    for query in store.task_queries(task.name):
        if query.user_id in wanted:
            found.setdefault(query.user_id, set()).add(query_split(query.split, query.user_id))
    return {u: found.get(u) or {user_split(u)} for u in users}


def select_sharers(
    histories: dict[str, list[Behavior]], strategy: str, k: int, min_history: int = 10, seed: int = 0
) -> list[str]:
    """Up to k sharers. history-cluster: k-means (k clusters at most) over user embeddings, the
    user with the most history in each cluster, if they have at least `min_history` items;
    most-active: the k users with the most history; random: k users with enough history."""
    if strategy not in STRATEGIES:
        raise PersonaError(f"--strategy {strategy}: expected one of {', '.join(STRATEGIES)}")
    if k < 1:
        raise PersonaError(f"--k must be at least 1, got {k}")
    users = sorted(histories, key=id_sort_key)
    enough = [u for u in users if len(histories[u]) >= min_history]
    if not enough:
        raise PersonaError(f"no candidate user has at least {min_history} history items (lower --min-history)")
    if strategy == "most-active":
        return sorted(sorted(enough, key=lambda u: -len(histories[u]))[:k], key=id_sort_key)
    if strategy == "random":
        return sorted(random.Random(seed).sample(enough, min(k, len(enough))), key=id_sort_key)
    return _cluster_sharers(histories, users, k, min_history, seed)


def _cluster_sharers(histories: dict[str, list[Behavior]], users: list[str], k: int, min_history: int, seed: int) -> list[str]:
    from sklearn.cluster import KMeans

    embeddings = np.stack([user_embedding([item.vector for item in histories[u]]) for u in users])
    clusters = min(k, len(users))
    labels = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit_predict(embeddings)
    sharers = []
    for cluster in range(clusters):
        members = [u for u, label in zip(users, labels) if label == cluster and len(histories[u]) >= min_history]
        if members:
            sharers.append(max(members, key=lambda u: (len(histories[u]), -users.index(u))))
    return sorted(sharers, key=id_sort_key)


# ---------- training and registering ----------


@dataclass
class Registration:
    """What one register-sharers run did."""

    task: str
    pool_version: int = 0
    tags: list[str] = field(default_factory=list)
    sharers: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    pieces: int = 0
    bytes: int = 0
    lora_seconds: list[float] = field(default_factory=list)
    gate_seconds: list[float] = field(default_factory=list)


def register_sharers(
    store: Store,
    llm: LLM | Callable[[], LLM],
    task: Task,
    sharers: list[str],
    lora: LoraSettings,
    gates: GateSettings,
    base: Optional[str] = None,
    share_ratio: float = 1.0,
    tags: Optional[list[str]] = None,
    selection: Optional[dict] = None,
    progress: Optional[Progress] = None,
    pairs: str = "none",
    engine: Engine = LOCAL,
) -> Registration:
    """Train each sharer's LoRA on their history (the OPPU trainer, on top of `base`) and then its
    gates with the LoRA frozen; write the pieces (a `share_ratio` share of each sharer's modules)
    as a new pool version tagged pool-N plus `tags`. A stopped run resumes from finished sharers.
    `pairs` (history_pairs) is how history items become examples; the pool records it for assembly.
    A Ray `engine` trains the sharers on its workers (each loads `llm`, a loader, and the base
    chain once); this process stages what they return and writes the pool."""
    lora.validate()
    gates.validate()
    check_recipe(pairs)
    if not 0 < share_ratio <= 1:
        raise PersonaError(f"--share-ratio must be in (0, 1], got {share_ratio}")
    if not sharers:
        raise PersonaError("no sharers to register")
    store.require_users(sharers)
    splits = user_splits(store, task, sharers)
    testers = [s for s in sharers if "test" in splits[s]]
    if testers:
        raise PersonaError(f"user '{testers[0]}' is a test user; test users never become sharers")
    tag_list = [next_pool_tag(store), *(tags or [])]
    for tag in tags or []:
        check_tag(tag)
        if tag in store.pool_tags():
            raise PersonaError(f"pool tag '{tag}' exists")
    histories = paired_histories(store, task, store.histories(sharers, task.name), pairs, lora.seed)
    empty = [s for s in sharers if not histories.get(s)]
    if empty:
        raise PersonaError(f"sharer '{empty[0]}' has no {task.name} history")
    chain = base_chain(store, base)
    load_llm = llm
    llm = loaded(llm)
    _check_pool_compatible(store, task, llm.id, base, sharers, gates.kind)
    staging = _staging_dir(store, task, llm, sharers, lora, gates, [chain_key(chain), histories])
    result = Registration(task=task.name, sharers=list(sharers))
    config = {"lora": asdict(lora), "gates": asdict(gates), "share_ratio": share_ratio, "selection": selection or {}, "seq2seq": llm.is_seq2seq, "pairs": pairs}
    staged = {sharer: staging / f"{n:04d}.safetensors" for n, sharer in enumerate(sharers, 1)}
    to_train = [s for s in sharers if not staged[s].exists()]
    if engine.is_local:
        apply_chain(llm, chain)
        make_trainer = lambda: lambda examples: _train_sharer(llm, examples, lora, gates, progress)  # noqa: E731
    else:
        make_trainer = lambda: _sharer_trainer(load_llm, chain, lora, gates)  # noqa: E731
    examples = (history_examples(task, histories[s]) for s in to_train)
    for trained, sharer in zip(fan_out(engine, make_trainer, examples, len(to_train), progress, "registering sharers"), to_train):
        _stage(staged[sharer], *trained)
    pieces: list[Piece] = []
    for sharer in sharers:
        weights, gate_vectors, metrics = _read_staged(staged[sharer])
        if sharer not in to_train:
            result.resumed.append(sharer)
        result.lora_seconds.append(metrics["lora_seconds"])
        result.gate_seconds.append(metrics["gate_seconds"])
        shared = _shared_modules(sorted(weights.modules), share_ratio, f"{lora.seed}:{sharer}")
        for module in shared:
            a, b = weights.modules[module]
            pieces.append(
                Piece(
                    task=task.name, sharer_id=sharer, module=module, r=a.shape[0], alpha=weights.scales[module] * a.shape[0],
                    llm=llm.id, tensors=piece_tensors(a, b, gate_vectors[module]), registration=int(tag_list[0].split("-")[1]),
                    layer=layer_of(module), base=base, config=config, metrics=metrics,
                )  # fmt: skip
            )
    version = store.add_pool_version(pieces, tag_list)
    shutil.rmtree(staging, ignore_errors=True)
    result.pool_version, result.tags = version.version, tag_list
    result.pieces, result.bytes = len(pieces), sum(len(p.tensors) for p in pieces)
    return result


def _train_sharer(
    llm: LLM, examples: list, lora: LoraSettings, gates: GateSettings, progress: Optional[Progress] = None
) -> tuple[LoraWeights, dict[str, torch.Tensor], dict]:
    """One sharer: its LoRA on its examples, then its gates (trained with the LoRA frozen, or the
    mean of its module inputs), and what it took."""
    trained = train_lora(llm, examples, lora, progress=progress, stage="this sharer's LoRA")
    if gates.kind == "mean":
        trained_gates = mean_gates(llm, sorted(trained.weights.modules), examples, gates)
    else:
        trained_gates = train_gates(llm, trained.weights, examples, gates, progress, stage="this sharer's gates")
    curve = trained_gates.curve
    metrics = {
        "examples": len(examples), "lora_seconds": trained.seconds, "gate_seconds": trained_gates.seconds,
        "lora_final_loss": trained.curve[-1]["loss"], "gate_first_loss": curve[0]["loss"] if curve else None,
        "gate_final_loss": curve[-1]["loss"] if curve else None,
    }  # fmt: skip
    return trained.weights, trained_gates.gates, metrics


def _sharer_trainer(load_llm: Callable[[], LLM], chain: list, lora: LoraSettings, gates: GateSettings) -> Callable:
    """A Ray worker's trainer: its own LLM with the base chain merged, loaded once."""
    llm = loaded(load_llm)
    apply_chain(llm, chain)
    return lambda examples: _train_sharer(llm, examples, lora, gates)


def next_pool_tag(store: Store) -> str:
    """pool-N for the next registration (one more than the highest N so far)."""
    numbers = [int(m.group(1)) for t in store.pool_tags() if (m := re.fullmatch(r"pool-(\d+)", t))]
    return f"pool-{max(numbers, default=0) + 1}"


def _check_pool_compatible(store: Store, task: Task, llm_id: str, base: Optional[str], sharers: list[str], gate_kind: str) -> None:
    """One task's pool holds pieces of one LLM on one base, with one kind of gate (a registration
    replaces its sharers' pieces and keeps the others'); mixing them would be meaningless."""
    if not store.pool_versions():
        return
    pieces = store.pool_pieces(store.resolve_pool().version, task.name, with_tensors=False)
    if pieces and (pieces[0].llm, pieces[0].base) != (llm_id, base):
        raise PersonaError(
            f"the {task.name} pool holds pieces of LLM '{pieces[0].llm}' on base '{pieces[0].base}'; "
            f"register on the same (--llm, --base {pieces[0].base or 'none'})"
        )
    kept = {p.sharer_id: gate_kind_of(p) for p in pieces if gate_kind_of(p) != gate_kind and p.sharer_id not in sharers}
    if kept:
        names = sorted(kept, key=id_sort_key)
        raise PersonaError(
            f"the {task.name} pool keeps sharers with {kept[names[0]]} gates ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); "
            f"one pool holds one kind of gate: register with that --gates, or register those sharers again too"
        )


def _shared_modules(modules: list[str], ratio: float, seed: str) -> list[str]:
    """The modules a sharer shares: all of them, or a seeded random `ratio` of them (at least one)."""
    if ratio >= 1:
        return modules
    count = max(1, round(ratio * len(modules)))
    return sorted(random.Random(seed).sample(modules, count), key=id_sort_key)


def _staging_dir(
    store: Store, task: Task, llm: LLM, sharers: list[str], lora: LoraSettings, gates: GateSettings, inputs: list
) -> Path:
    """Where this exact registration keeps its finished sharers until the pool version is written:
    keyed by the store, task, LLM, sharers, settings, the base chain's weights and the sharers'
    histories (`inputs`), so a changed base or history never resumes from stale pieces."""
    base_key, histories = inputs
    texts = {s: [(item.item_id, item.text, item.fields) for item in histories[s]] for s in sharers}
    key = json.dumps([store.uri, task.name, llm.id, base_key, sharers, asdict(lora), asdict(gates), texts], sort_keys=True, default=str)
    return cache_dir() / "registrations" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _stage(path: Path, weights: LoraWeights, gates: dict[str, torch.Tensor], metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in weights.modules.items():
        tensors[f"{module}.A"], tensors[f"{module}.B"], tensors[f"{module}.gate"] = a.contiguous(), b.contiguous(), gates[module]
    scales = {module: weights.scales[module] for module in weights.modules}
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"metrics": json.dumps(metrics), "scales": json.dumps(scales)})
    partial.replace(path)


def _read_staged(path: Path) -> tuple[LoraWeights, dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    scales = json.loads(metadata["scales"])
    weights = LoraWeights({m: (tensors[f"{m}.A"], tensors[f"{m}.B"]) for m in scales}, scales)
    return weights, {m: tensors[f"{m}.gate"] for m in scales}, json.loads(metadata["metrics"])
