"""The piece pool in memory: every sharer's (A, B, gate) per module, stacked for scoring, and the
compact per-user record of an assembly (per module: which sharers, with what weight).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from recipes import PersonaError
from recipes.kit.backbones import LLM
from recipes.kit.lora import LoraWeights, mix_pieces, zero_pad
from recipes.kit.plugins import base_chain
from recipes.kit.pool_rows import Mix, PoolRows
from recipes.kit.serving_plan import EditMaker, ServingPlan, require_llm
from store import Piece, PoolVersion, Query, Store, id_sort_key

_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(path: str) -> Optional[int]:
    """The block number in a module path ('model.layers.12.self_attn.q_proj' -> 12)."""
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None


def piece_tensors(a: torch.Tensor, b: torch.Tensor, gate: torch.Tensor) -> bytes:
    """A piece's stored form: safetensors bytes of lora_A (r×in), lora_B (out×r) and gate (in)."""
    tensors = {"lora_A": a, "lora_B": b, "gate": gate}
    return save_safetensors({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()})


@dataclass
class PoolModule:
    """The candidate pieces of one module: sharer ids with their stacked A, B·c and normalized gates."""

    sharers: list[str]
    a: torch.Tensor  # (S, R, in)
    b: torch.Tensor  # (S, out, R), scale c = alpha/r folded in
    gates: torch.Tensor  # (S, in), unit length

    def to(self, device: torch.device) -> "PoolModule":
        return PoolModule(self.sharers, self.a.to(device), self.b.to(device), self.gates.to(device))


@dataclass
class Pool:
    """One pool version of one task: what assembly scores and serving mixes."""

    task: str
    version: int
    tags: list[str]
    llm: str
    base: Optional[str]
    sharers: list[str]
    modules: dict[str, PoolModule] = field(default_factory=dict)
    seq2seq: bool = False
    pairs: str = "none"  # how sharers' history items became examples; assembly reads targets' the same way
    pair_seed: int = 0
    gate_kind: str = "trained"  # how the sharers' gates were made (gates.GATE_KINDS); assembly scores them accordingly

    @property
    def label(self) -> str:
        return pool_label(PoolVersion(self.version, self.tags))

    @property
    def module_order(self) -> list[str]:
        return sorted(self.modules)


def pool_label(pool: PoolVersion) -> str:
    """How a pool version is named in messages and runs: its pool-N tag, else another tag, else vN."""
    numbered = [t for t in pool.tags if re.fullmatch(r"pool-\d+", t)]
    return (numbered or pool.tags or [f"v{pool.version}"])[0]


def pool_from_pieces(task: str, pool: PoolVersion, pieces: list[Piece]) -> Pool:
    """Stack the pieces of one pool version (ranks zero-padded to the widest per module)."""
    if not pieces:
        raise PersonaError(f"pool {pool_label(pool)} holds no {task} pieces")
    llms = {p.llm for p in pieces}
    bases = {p.base for p in pieces}
    if len(llms) > 1 or len(bases) > 1:
        raise PersonaError(f"the {task} pool mixes LLMs or bases ({sorted(llms)}, {sorted(map(str, bases))})")
    by_module: dict[str, list[tuple[str, dict[str, torch.Tensor], float]]] = {}
    for piece in pieces:
        tensors = load_safetensors(piece.tensors)
        by_module.setdefault(piece.module, []).append((piece.sharer_id, tensors, piece.alpha / piece.r))
    modules = {}
    for path, parts in by_module.items():
        rank = max(t["lora_A"].shape[0] for _, t, _ in parts)
        a = torch.stack([zero_pad(t["lora_A"], rank, 0) for _, t, _ in parts])
        b = torch.stack([zero_pad(t["lora_B"] * scale, rank, 1) for _, t, scale in parts])
        gates = torch.nn.functional.normalize(torch.stack([t["gate"] for _, t, _ in parts]), dim=-1)
        modules[path] = PoolModule([s for s, _, _ in parts], a, b, gates)
    sharers = sorted({p.sharer_id for p in pieces}, key=id_sort_key)
    config = pieces[0].config
    return Pool(
        task, pool.version, pool.tags, llms.pop(), bases.pop(), sharers, modules, bool(config.get("seq2seq", False)),
        config.get("pairs", "none"), int(config.get("lora", {}).get("seed", 0)), _gate_kind(task, pool, pieces),
    )  # fmt: skip


def gate_kind_of(piece: Piece) -> str:
    """How a piece's gate was made (pieces registered before gate kinds existed were trained)."""
    return piece.config.get("gates", {}).get("kind", "trained")


def _gate_kind(task: str, pool: PoolVersion, pieces: list[Piece]) -> str:
    """The one gate kind of a pool's pieces: trained and mean gates are scored differently."""
    kinds = sorted({gate_kind_of(p) for p in pieces})
    if len(kinds) > 1:
        raise PersonaError(f"pool {pool_label(pool)} mixes {task} pieces with {' and '.join(kinds)} gates")
    return kinds[0]


def load_pool(store: Store, task: str, ref: Optional[str] = None) -> Pool:
    """The pool version named by `ref` (tag or version; default the newest), only `task`'s pieces."""
    return read_pool(store, task, store.resolve_pool(ref))


def read_pool(store: Store, task: str, version: PoolVersion) -> Pool:
    """`task`'s pieces of a pool version the caller has already resolved."""
    return pool_from_pieces(task, version, store.pool_pieces(version.version, task))


# ---------- a user's assembled adapter ----------

Choices = dict[str, list[tuple[str, float]]]
"""Per module path: (sharer id, weight) of the chosen pieces, heaviest first."""


def encode_choices(pool: Pool, choices: Choices, top_k: int) -> bytes:
    """Per module (in the pool's module order) k sharer indices (int16) and weights (float32);
    index -1 marks an empty slot. This is all that is stored per target user."""
    index = {s: i for i, s in enumerate(pool.sharers)}
    order = pool.module_order
    ids = torch.full((len(order), top_k), -1, dtype=torch.int16)
    weights = torch.zeros((len(order), top_k), dtype=torch.float32)
    for row, path in enumerate(order):
        for slot, (sharer, weight) in enumerate(choices.get(path, [])[:top_k]):
            ids[row, slot] = index[sharer]
            weights[row, slot] = weight
    return save_safetensors({"sharer": ids, "weight": weights})


def decode_choices(pool: Pool, data: bytes) -> Choices:
    tensors = load_safetensors(data)
    ids, weights = tensors["sharer"], tensors["weight"]
    order = pool.module_order
    if ids.shape[0] != len(order):
        raise PersonaError(f"an assembly does not match pool {pool.label} ({ids.shape[0]} modules, the pool has {len(order)})")
    choices: Choices = {}
    for row, path in enumerate(order):
        picked = [(pool.sharers[int(i)], float(w)) for i, w in zip(ids[row], weights[row]) if int(i) >= 0]
        if picked:
            choices[path] = picked
    return choices


def mixed_lora(pool: Pool, choices: Choices) -> LoraWeights:
    """The adapter sum_s w_s·c_s·B_s·A_s of every module: one LoRA of rank k·r whose A stacks the
    chosen A's and whose B stacks the chosen B's times weight and scale (the paper's formula)."""
    modules = {}
    for path, picked in choices.items():
        module = pool.modules[path]
        rows = [module.sharers.index(sharer) for sharer, _ in picked]
        weights = torch.tensor([w for _, w in picked], dtype=module.b.dtype)
        modules[path] = mix_pieces(module.a[rows], module.b[rows], weights)
    return LoraWeights(modules, {path: 1.0 for path in modules})


def uniform_choices(pool: Pool) -> Choices:
    """Every sharer's pieces with equal weight in every module: Per-Pcs's non-personal ablation."""
    return {path: [(sharer, 1 / len(module.sharers)) for sharer in module.sharers] for path, module in pool.modules.items()}


def mix_weights(pool: Pool, choices: Choices) -> Mix:
    """Per module, one weight per piece of the pool (zero where not chosen)."""
    mix = {}
    for path, picked in choices.items():
        sharers = pool.modules[path].sharers
        weights = torch.zeros(len(sharers))
        for sharer, weight in picked:
            weights[sharers.index(sharer)] += weight
        mix[path] = weights
    return mix


def pool_plan(store: Store, pool: Pool, keys: list[str], load: Callable[[], dict[str, Choices]], details: dict) -> ServingPlan:
    """Serving mixes of the pool's pieces: prompt i through the mix `load()[keys[i]]`, over the
    pool's base (Per-Pcs's assemblies and uniform gates, PEFT retrieval's nearest sharers)."""
    return ServingPlan(
        chain=base_chain(store, pool.base), edit=_pool_mixes(pool, keys, load),
        details={"pool": pool.label, "pool_version": pool.version, "per_user_adapters": len(set(keys)), **details},
    )  # fmt: skip


def _pool_mixes(pool: Pool, keys: list[str], load: Callable[[], dict[str, Choices]]) -> EditMaker:
    """An edit giving prompt i the mix `load()[keys[i]]`, with the pool's pieces read once per batch."""

    def make(llm: LLM, queries: list[Query]) -> PoolRows:
        require_llm(pool.llm, llm)
        mixes = {key: mix_weights(pool, choices) for key, choices in load().items()}
        pieces = {path: (module.a, module.b) for path, module in pool.modules.items()}
        return PoolRows(llm.model, pieces, [mixes[key] for key in keys])

    return make


def sharer_mass(choices: Choices) -> dict[str, float]:
    """Each sharer's share of the total weight over all modules, heaviest first."""
    totals: dict[str, float] = {}
    for picked in choices.values():
        for sharer, weight in picked:
            totals[sharer] = totals.get(sharer, 0.0) + weight
    whole = sum(totals.values()) or 1.0
    return {s: round(w / whole, 4) for s, w in sorted(totals.items(), key=lambda x: -x[1])}


# ---------- describing pool versions ----------


def pool_summary(store: Store, ref: Optional[str] = None, task: Optional[str] = None) -> dict:
    """One pool version: its tags, and per task the sharers, pieces per module kind and bytes."""
    version = store.resolve_pool(ref)
    pieces = store.pool_pieces(version.version, task, with_tensors=False)
    tasks: dict[str, dict] = {}
    for piece in pieces:
        entry = tasks.setdefault(
            piece.task, {"llm": piece.llm, "base": piece.base, "gates": gate_kind_of(piece), "sharers": {}, "modules": {}, "bytes": 0}
        )
        sharer = entry["sharers"].setdefault(
            piece.sharer_id, {"pieces": 0, "bytes": 0, "registration": piece.registration, **piece.metrics}
        )
        sharer["pieces"] += 1
        sharer["bytes"] += piece.size
        kind = piece.module.rsplit(".", 1)[-1]
        entry["modules"][kind] = entry["modules"].get(kind, 0) + 1
        entry["bytes"] += piece.size
    return {
        "version": version.version, "tags": version.tags, "created_at": version.created_at, "pieces": len(pieces),
        "bytes": sum(p.size for p in pieces), "tasks": tasks,
    }  # fmt: skip


def pool_diff(store: Store, old: str, new: str, task: Optional[str] = None) -> dict:
    """What changed between two pool versions: sharers added, removed or re-registered, and pieces."""
    before, after = store.resolve_pool(old), store.resolve_pool(new)

    def keyed(version: PoolVersion) -> dict[tuple[str, str, str], Piece]:
        return {(p.task, p.sharer_id, p.module): p for p in store.pool_pieces(version.version, task, with_tensors=False)}

    a, b = keyed(before), keyed(after)
    sharers_a = {(t, s) for t, s, _ in a}
    sharers_b = {(t, s) for t, s, _ in b}
    changed = {(t, s) for (t, s, m), p in b.items() if (t, s, m) in a and a[(t, s, m)].registration != p.registration}

    def listed(pairs: set[tuple[str, str]]) -> list[str]:
        return [f"{t}/{s}" for t, s in sorted(pairs, key=lambda x: (x[0], id_sort_key(x[1])))]

    return {
        "old": {"version": before.version, "tags": before.tags}, "new": {"version": after.version, "tags": after.tags},
        "sharers_added": listed(sharers_b - sharers_a), "sharers_removed": listed(sharers_a - sharers_b),
        "sharers_retrained": listed(changed - (sharers_b - sharers_a)),
        "pieces_added": len(set(b) - set(a)), "pieces_removed": len(set(a) - set(b)),
        "pieces_replaced": sum(1 for k in set(a) & set(b) if a[k].registration != b[k].registration),
    }  # fmt: skip
