"""Forward-only batches whose rows share a prefix: the prefix once per packed sequence, not per row.

History examples open with the same chat turn and task instruction (a third of a LaMP-7 row).
Training shares that prefix through a KV cache computed first; a pass whose hooks must treat the
prefix like every other token in the same forward (Per-Pcs assembly applies each module's chosen
pieces to all of a batch's tokens, chosen from that very batch) cannot, so rows are packed
instead: one sequence holds the prefix and then several rows' remainders, and a 4D attention mask
lets each remainder see the prefix and itself only, with positions that go on after the prefix.
Each row's tokens then compute exactly what they compute alone (up to float rounding).
"""

from __future__ import annotations

from typing import Optional

import torch

from recipes.kit.backbones import LLM
from recipes.kit.training_loop import IGNORE, shared_prefix_length

ROWS_PER_SEQUENCE = 4
"""Rows packed behind one prefix. More share the prefix further but make the attention matrix
(quadratic in the packed length) grow: at LaMP-7's lengths 4 saves most of the prefix's cost."""

MASK_KINDS = {"sdpa": "bool", "eager": "additive"}
"""Attention implementations that take a custom 4D mask, and the form each expects."""


def packed_causal_batch(
    llm: LLM, rows: list[tuple[list[int], list[int]]], per_sequence: int = ROWS_PER_SEQUENCE
) -> Optional[dict[str, torch.Tensor]]:
    """Tensors for tokenized causal rows (ids, labels) packed behind their shared prefix, or None
    where packing does not apply (no shared prefix, or an attention kernel without 4D masks).
    `labels` keep each row's labelled tokens where they sit in the packed sequence."""
    kind = MASK_KINDS.get(getattr(llm.model.config, "_attn_implementation", None) or "")
    shared = shared_prefix_length(rows)
    if kind is None or shared == 0:
        return None
    prefix = torch.tensor(rows[0][0][:shared])
    sequences = [rows[i : i + per_sequence] for i in range(0, len(rows), per_sequence)]
    width = max(shared + sum(len(ids) - shared for ids, _ in group) for group in sequences)
    ids = torch.full((len(sequences), width), llm.tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    positions = torch.zeros_like(ids)
    segment = torch.full_like(ids, -1)  # -1: padding, 0: the prefix, n: the n-th row of the sequence
    for s, group in enumerate(sequences):
        start = width - shared - sum(len(row_ids) - shared for row_ids, _ in group)  # left padding
        ids[s, start : start + shared] = prefix
        positions[s, start : start + shared] = torch.arange(shared)
        segment[s, start : start + shared] = 0
        at = start + shared
        for n, (row_ids, row_labels) in enumerate(group, start=1):
            rest = len(row_ids) - shared
            ids[s, at : at + rest] = torch.tensor(row_ids[shared:])
            labels[s, at : at + rest] = torch.tensor(row_labels[shared:])
            positions[s, at : at + rest] = torch.arange(shared, shared + rest)
            segment[s, at : at + rest] = n
            at += rest
    mask = _attention_mask(segment, kind, llm.model.dtype)
    device = llm.device
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device), "labels": labels.to(device)}


def _attention_mask(segment: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(sequences, 1, length, length): a token sees earlier tokens of its own row and the prefix;
    the prefix sees only itself; padding sees only itself (a query that sees nothing would be NaN)."""
    query, key = segment[:, :, None], segment[:, None, :]
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (((query == key) & (query >= 0)) | ((key == 0) & (query > 0)))
    allowed |= torch.eye(length, dtype=torch.bool)
    allowed = allowed[:, None]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
