"""Per-Pcs assembly: a target user's adapter built from the pool without training.

The target's history runs through the base model in batches. At every pooled module, in
forward order, each candidate piece is scored by the mean cosine between its gate and the
module's inputs at the scored positions (the output tokens of task-format items, every token of
plain texts: `history_format` 'text' reads every item as plain text, about a quarter of the tokens
of a LaMP-7 task-format item); for `mean` gates (gates.py) input directions and gates are both
taken less the module's mean gate, so that a piece scores by how much more the target's writing
resembles its sharer's than the other sharers'. The top-k pieces get weights softmax(score/sqrt(n)) and the module adds their
mixed update, so later layers are scored on activations the earlier assembled layers changed.
Weights are averaged over batches; the k heaviest per module, renormalized, are the adapter.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch

from recipes import PersonaError
from recipes.kit.history_pairs import paired_histories
from recipes.kit.training_data import history_examples
from recipes.kit.backbones import LLM, loaded
from recipes.kit.engine import LOCAL, Engine, fan_out
from recipes.kit.hooks import forward_hooks
from recipes.kit.lora import mix_pieces
from recipes.kit.plugins import apply_chain, base_chain
from recipes.kit.packed_rows import packed_causal_batch
from recipes.kit.training_loop import IGNORE, PRECISIONS, Example, TokenizedExamples, autocast_weights
from recipes.methods.perpcs.pool import Choices, Pool, decode_choices, encode_choices, load_pool, mixed_lora, pool_label, read_pool
from recipes.kit.progress import Progress
from recipes.kit.tasks import Task
from store import AssemblyRecord, Store


HISTORY_FORMATS = ("task", "text")
"""How assembly reads a history item: as the sharers trained on it, or as plain text."""


class _Assembler:
    """Forward hooks that choose and apply the top-k pieces of every pooled module, batch by batch."""

    def __init__(self, pool: Pool, top_k: int, device: torch.device) -> None:
        self.pool = pool
        self.top_k = top_k
        self.modules = {path: module.to(device) for path, module in pool.modules.items()}
        self.scoring = {path: _scoring(module.gates, pool.gate_kind) for path, module in self.modules.items()}
        self.sums = {path: torch.zeros(len(module.sharers), dtype=torch.float64) for path, module in pool.modules.items()}
        self.masks: dict[int, torch.Tensor] = {}
        self.batches = 0

    def hooked(self, model: torch.nn.Module) -> ContextManager[None]:
        return forward_hooks(model, {path: self._hook(path) for path in self.modules})

    def _hook(self, path: str):
        module = self.modules[path]
        centre, directions = self.scoring[path]

        def assemble_here(_: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            mask = self.masks[x.shape[1]].to(x.dtype)
            unit = torch.nn.functional.normalize(x.float(), dim=-1)
            cosines = (unit if centre is None else unit - centre) @ directions.T  # (B, T, S)
            scores = (cosines * mask[..., None]).sum((0, 1)) / mask.sum()
            top = scores.topk(min(self.top_k, len(module.sharers)))
            weights = torch.softmax(top.values / math.sqrt(x.shape[-1]), dim=0)
            self.sums[path][top.indices.cpu()] += weights.double().cpu()
            a, b = mix_pieces(module.a[top.indices], module.b[top.indices], weights)
            return output + (x @ a.T.to(x.dtype)) @ b.T.to(x.dtype)

        return assemble_here

    def choices(self) -> Choices:
        """Per module the k sharers with the most weight averaged over batches, renormalized."""
        chosen: Choices = {}
        for path, sums in self.sums.items():
            mean = sums / max(self.batches, 1)
            top = mean.topk(min(self.top_k, len(mean)))
            total = float(top.values.sum()) or 1.0
            sharers = self.modules[path].sharers
            chosen[path] = [(sharers[int(i)], float(v) / total) for i, v in zip(top.indices, top.values) if float(v) > 0]
        return chosen


def _scoring(gates: torch.Tensor, kind: str) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(centre, directions) a module's input directions are scored with: trained gates as they
    are (no centre); mean gates less their mean, renormalized (what the sharers' activations share
    says nothing about whose piece fits)."""
    if kind != "mean":
        return None, gates
    centre = gates.mean(0)
    return centre, torch.nn.functional.normalize(gates - centre, dim=-1)


def scored_positions(llm: LLM, batch: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Which positions score the pieces, keyed by sequence length: the output tokens (labels) on
    the causal / decoder side, every real token on a seq2seq encoder side."""
    labels = batch["labels"] != IGNORE
    masks = {labels.shape[1]: labels}
    if llm.is_seq2seq:
        masks[batch["attention_mask"].shape[1]] = batch["attention_mask"].bool()
    return masks


def _distinct_lengths(llm: LLM, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A seq2seq batch whose encoder and decoder lengths are equal gets one more (masked) encoder
    pad, so a module's input length tells which side it is on."""
    if llm.is_seq2seq and batch["input_ids"].shape[1] == batch["labels"].shape[1]:
        pad = torch.full_like(batch["input_ids"][:, :1], llm.tokenizer.pad_token_id)
        batch = {**batch, "input_ids": torch.cat([batch["input_ids"], pad], 1),
                 "attention_mask": torch.cat([batch["attention_mask"], torch.zeros_like(pad)], 1)}  # fmt: skip
    return batch


def assembly_batch(llm: LLM, examples: list[Example], max_length: int, pack: bool = True) -> dict[str, torch.Tensor]:
    """Every example read whole. Causal rows that share their opening (chat turn, instruction) are
    packed behind one copy of it, which the batch's chosen pieces change like every other token
    (a prefix computed ahead as a KV cache could not be); otherwise (or without `pack`) rows are
    padded side by side."""
    data = TokenizedExamples(llm, examples, max_length)  # tokenized once, whichever layout follows
    packed = packed_causal_batch(llm, data.rows) if pack and not llm.is_seq2seq else None
    return packed if packed is not None else _distinct_lengths(llm, data.batch(range(len(data)), share_prefix=False))


@torch.inference_mode()
def assemble_user(
    llm: LLM, pool: Pool, examples: list[Example], top_k: int = 3, batch_size: int = 16, max_length: int = 256,
    precision: str = "auto", pack: bool = True,
) -> Choices:  # fmt: skip
    """The chosen pieces and weights of one target user, from their history examples, over the
    LLM as loaded (the pool's base already merged into it). Examples are batched by length (less
    padding); `precision` 'auto' runs in bfloat16 where the hardware has it, like training.
    `pack` False pads rows side by side instead of packing them behind their shared opening (the
    same choices, slower: benchmarks/perpcs_vs_oppu/packing.py compares the two)."""
    if top_k < 1:
        raise PersonaError(f"--top-k must be at least 1, got {top_k}")
    if not examples:
        raise PersonaError("the target user has no history to assemble from")
    assembler = _Assembler(pool, top_k, llm.device)

    def next_batch(masks: dict[int, torch.Tensor]) -> None:
        assembler.masks = masks
        assembler.batches += 1

    with assembler.hooked(llm.model):
        read_history(llm, examples, batch_size, max_length, precision, next_batch, pack)
    return assembler.choices()


def read_history(
    llm: LLM, examples: list[Example], batch_size: int, max_length: int, precision: str,
    on_batch: Callable[[dict[int, torch.Tensor]], None], pack: bool = True,
) -> int:  # fmt: skip
    """Run a history's examples through the LLM as assembly reads them (by length, each whole,
    `batch_size` at a time, under `precision`), handing `on_batch` each batch's scored positions
    before its forward pass, for the forward hooks that read them. Returns the answer tokens read.
    Mean gates (gates.py) are made by the same reading, so they see what assembly will compare."""
    llm.model.eval()
    ordered = sorted(examples, key=lambda e: len(e.prompt or "") + len(e.target))
    tokens = 0
    with autocast_weights(llm, precision):
        for start in range(0, len(ordered), batch_size):
            batch = assembly_batch(llm, ordered[start : start + batch_size], max_length, pack)
            on_batch(scored_positions(llm, batch))
            inputs = {k: v for k, v in batch.items() if k != "labels"} if not llm.is_seq2seq else batch
            llm.model(**inputs, **({} if llm.is_seq2seq else {"logits_to_keep": 1}))
            tokens += int((batch["labels"] != IGNORE).sum())  # not the attention mask: a packed batch's is additive
    return tokens


# ---------- assembling users of the store ----------


@dataclass
class AssemblyReport:
    pool: str
    pool_version: int
    top_k: int
    assembled: dict[str, Choices] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    stored_bytes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def assemble_users(
    store: Store,
    llm: LLM | Callable[[], LLM],
    task: Task,
    user_ids: list[str],
    top_k: int = 3,
    pool_ref: Optional[str] = None,
    batch_size: int = 16,
    max_length: int = 256,
    progress: Optional[Progress] = None,
    precision: str = "auto",
    max_items: Optional[int] = None,
    engine: Engine = LOCAL,
    history_format: str = "task",
) -> AssemblyReport:
    """Assemble every user's adapter against one pool version and store (sharer, weight) per
    module for each, in one write. Seconds per user count the history's forward passes only.
    `max_items` assembles from each user's most recent items only (faster, fewer scored tokens).
    `history_format` 'task' reads each item as the pool's sharers trained on it (task-format pairs
    where the pool has them), 'text' as its plain text (faster: no instruction, no synthesized input;
    but the gates, trained on the pool's format, then choose other pieces for most modules).
    A Ray `engine` assembles on its workers, each of which loads `llm` (a loader) and reads the
    pool and its base chain from the store once; this process writes every record."""
    if top_k < 1:
        raise PersonaError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise PersonaError(f"--batch-size must be at least 1, got {batch_size}")
    if max_items is not None and max_items < 1:
        raise PersonaError(f"--max-items must be at least 1, got {max_items}")
    if precision not in PRECISIONS:
        raise PersonaError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if history_format not in HISTORY_FORMATS:
        raise PersonaError(f"--history-format {history_format}: expected one of {', '.join(HISTORY_FORMATS)}")
    store.require_users(user_ids)
    pool = load_pool(store, task.name, pool_ref)
    readings = assembly_examples(store, task, pool, user_ids, max_items, history_format)
    settings = (top_k, batch_size, max_length, precision)
    if engine.is_local:
        here = pool_llm(llm, store, pool)
        make_assembler = lambda: lambda examples: _timed_assembly(here, pool, examples, *settings)  # noqa: E731
    else:
        where, version = (store.uri, store.storage_options), str(pool.version)
        make_assembler = lambda: _ray_assembler(where, task.name, version, llm, settings)  # noqa: E731
    result = AssemblyReport(pool.label, pool.version, top_k)
    work = {user: readings[user] for user in user_ids if readings[user]}
    result.skipped = {user: f"no {task.name} history" for user in user_ids if not readings[user]}
    records = []
    # whole_examples: assemblies stored before 2026-12-07 read batched examples without the
    # instruction they share (and lack this key)
    config = {"batch_size": batch_size, "max_length": max_length, "precision": precision, "max_items": max_items, "whole_examples": True,
              "history_format": history_format}  # fmt: skip
    assembled = fan_out(engine, make_assembler, work.values(), len(work), progress, "assembling adapters")
    with autocast_weights(here, precision) if engine.is_local else contextlib.nullcontext():  # weights cast once, not per user
        for (choices, seconds), user in zip(assembled, work):
            choice = encode_choices(pool, choices, top_k)
            records.append(
                AssemblyRecord(task.name, user, pool.version, top_k, pool.llm, choice, pool.base, {**config, "items": len(work[user])}, seconds)
            )
            result.assembled[user], result.seconds[user], result.stored_bytes[user] = choices, seconds, len(choice)
    store.put_assemblies(records)
    return result


def assembly_examples(
    store: Store, task: Task, pool: Pool, user_ids: list[str], max_items: Optional[int] = None, history_format: str = "task"
) -> dict[str, list[Example]]:
    """What assembly reads of each user (empty for a user without history): their most recent
    `max_items` items (all without it), in the pool's pair format or as plain text."""
    histories = store.histories(user_ids, task.name)
    if history_format == "task":
        histories = paired_histories(store, task, histories, pool.pairs, pool.pair_seed)
    examples = {}
    for user in user_ids:
        items = histories.get(user, [])
        examples[user] = history_examples(task, items[-max_items:] if max_items else items, as_text=history_format == "text")
    return examples


def pool_llm(llm: LLM | Callable[[], LLM], store: Store, pool: Pool) -> LLM:
    """The LLM the pool was made for, with the pool's base chain merged in."""
    chain = base_chain(store, pool.base)
    llm = loaded(llm)
    if pool.llm != llm.id:
        raise PersonaError(f"pool {pool.label} was made for LLM '{pool.llm}', not '{llm.id}' (pass --llm {pool.llm})")
    apply_chain(llm, chain)
    return llm


def _timed_assembly(llm: LLM, pool: Pool, examples: list[Example], top_k: int, batch_size: int, max_length: int, precision: str) -> tuple[Choices, float]:
    started = time.perf_counter()
    choices = assemble_user(llm, pool, examples, top_k, batch_size, max_length, precision)
    return choices, round(time.perf_counter() - started, 4)


def _ray_assembler(where: tuple[str, dict], task: str, version: str, load_llm: Callable[[], LLM], settings: tuple) -> Callable:
    """A Ray worker's assembler: the store opened by URI, the pool read and the LLM loaded once."""
    store = Store(*where)
    pool = load_pool(store, task, version)
    llm = pool_llm(load_llm, store, pool)
    return lambda examples: _timed_assembly(llm, pool, examples, *settings)


# ---------- export ----------


def export_assembly(store: Store, task: Task, user_id: str, directory: str, pool_ref: Optional[str] = None) -> dict:
    """Write a user's stored assembly as a standard peft adapter folder for the bare LLM: the
    chosen pieces concatenated (rank k·r per module) with the pool's base chain folded in."""
    from recipes.kit.lora import combine, export_peft
    from recipes.kit.plugins import lora_weights

    version = store.resolve_pool(pool_ref)
    record = store.get_assemblies(task.name, [user_id], version.version).get(user_id)
    if record is None:
        raise PersonaError(
            f"user '{user_id}' has no {task.name} assembly against pool {pool_label(version)} (run `persona assemble --user {user_id}`)"
        )
    pool = read_pool(store, task.name, version)
    chain = base_chain(store, pool.base)
    assembled = mixed_lora(pool, decode_choices(pool, record.choice))
    weights = combine([lora_weights(p) for p in chain] + [assembled])
    path = export_peft(weights, pool.llm, directory, pool.seq2seq)
    return {
        "user_id": user_id, "directory": str(path), "pool": pool.label, "pool_version": pool.version, "top_k": record.top_k,
        "folded_bases": [p.name for p in chain], "rank": max(weights.ranks.values()), "modules": len(weights.modules),
    }  # fmt: skip
