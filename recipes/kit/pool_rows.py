"""Per-row mixes of one shared set of LoRA pieces, applied once per batch.

Per-Pcs and PEFT retrieval give every user a weighted mix of the same pool's pieces
(sum_s w_s·B_s·A_s). Serving each row its own mixed adapter (`RowLora`) reads every row's A and B
at every decoding step: 16 rows of rank 24 move ~2.5x the bytes of the 19-sharer pool itself,
and the uniform-gates ablation (every sharer, rank S·r on every row) 16x. Here a module's pieces
are read once per batch: x·A_pool for all pieces some row uses, scaled per row by that row's
piece weights (zero for pieces it did not choose), then ·B_pool. Small products cost their
calls more than their bytes on a CPU, so that wins only where the rows' own pieces are several
times the pool (measured, fp32, 2 cores: per-row is faster up to rows·k/S of about 4, e.g. Per-Pcs
top-3 of 19 sharers at 16 rows, 25 against 34 us per module; the pool past it, e.g. the
uniform-gates ablation, k = S, at 16 rows, 43 against 232 us). Below that the rows' own pieces are
gathered from the pool when rows enter a batch and applied per row, as `RowLora` does; a prompt's
prefill, where arithmetic decides (the pool costs S/k times a row's own pieces), always goes per
row. The same sum either way, so the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from recipes import PersonaError
from recipes.kit.hooks import Hook
from recipes.kit.lora import module_shapes
from recipes.kit.row_edits import RowEdit, rows_of

Pieces = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per module path: the pieces' A of shape (S, r, in) and B·scale of shape (S, out, r)."""
Mix = dict[str, torch.Tensor]
"""Per module path: one weight per piece, shape (S,); zero for a piece not chosen."""
CROSSOVER = 4
"""Rows' own pieces are applied per row while rows·(k·r) < CROSSOVER·(S·r), the pool once past it."""


@dataclass
class RowsState:
    """The rows of one module: their weights over the pool's columns (rows, S·r; each piece's
    weight repeated over its rank), and, when served per row, their own columns gathered:
    Aᵀ (rows, in, k·r) and (B·weight)ᵀ (rows, k·r, out), contiguous."""

    weights: torch.Tensor
    a: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None

    def rows(self, index: torch.Tensor) -> "RowsState":
        return RowsState(self.weights[index], *(None if t is None else t[index] for t in (self.a, self.b)))


Stack = dict[str, RowsState]


class PoolRows(RowEdit):
    """Serves prompt i the mix `mixes[i]` of `pieces` (modules missing from a mix: nothing)."""

    def __init__(self, model: torch.nn.Module, pieces: Pieces, mixes: list[Mix]) -> None:
        super().__init__(model)
        self.paths = sorted({p for mix in mixes for p in mix})
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        shapes = module_shapes(model, self.paths)
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.used: dict[str, torch.Tensor] = {}  # the pieces some row weights: one user's generate reads only theirs
        self.rank: dict[str, int] = {}
        self.width: dict[str, int] = {}  # the most columns one row weights: k pieces × rank
        for path in self.paths:
            a, b = pieces[path]
            if a.shape[2] != shapes[path][1] or b.shape[1] != shapes[path][0]:
                raise PersonaError(f"pool module '{path}' is {b.shape[1]}×{a.shape[2]} but the LLM's is {shapes[path][0]}×{shapes[path][1]}")
            weighted = torch.stack([mix[path] != 0 for mix in mixes if path in mix])  # (mixes, S)
            self.used[path] = used = weighted.any(0).nonzero().flatten()
            self.rank[path] = a.shape[1]
            self.width[path] = a.shape[1] * int(weighted.sum(1).max())
            self.a[path] = a[used].flatten(0, 1).contiguous().to(self.device, self.dtype)  # (S·r, in)
            self.b[path] = b[used].permute(0, 2, 1).flatten(0, 1).contiguous().to(self.device, self.dtype)  # (S·r, out)
        self.mixes = mixes

    def stack(self, prompts: list[int]) -> Stack:
        stacked: Stack = {}
        for path in self.paths:
            used = self.used[path]
            rows = [self.mixes[i][path][used] if path in self.mixes[i] else torch.zeros(len(used)) for i in prompts]
            weights = torch.stack(rows).float().repeat_interleave(self.rank[path], 1).to(self.device, self.dtype)
            state = RowsState(weights)
            if self._per_row(path, len(prompts)):
                state.a, state.b = self._own_columns(path, weights)
            stacked[path] = state
        return stacked

    def _per_row(self, path: str, rows: int) -> bool:
        """Whether these many rows are served their own pieces rather than the pool once (CROSSOVER)."""
        return rows * self.width[path] < CROSSOVER * self.a[path].shape[0]

    def _own_columns(self, path: str, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's own k·r columns of the pool (a row weighting fewer also takes zero-weight
        columns, which add nothing), as per-row Aᵀ and (B·weight)ᵀ."""
        columns = weights.abs().topk(self.width[path], dim=1).indices  # (rows, k·r)
        a = self.a[path][columns].transpose(1, 2).contiguous()  # (rows, in, k·r)
        b = (self.b[path][columns] * weights.gather(1, columns).unsqueeze(-1)).contiguous()  # (rows, k·r, out)
        return a, b

    def select(self, stack: Stack, index: torch.Tensor) -> Stack:
        return {path: state.rows(index) for path, state in stack.items()}

    def concat(self, first: Stack, second: Stack) -> Stack:
        joined = {}
        for path, one in first.items():
            two = second[path]
            state = RowsState(torch.cat([one.weights, two.weights]))
            if one.a is not None and two.a is not None and self._per_row(path, len(state.weights)):
                state.a, state.b = torch.cat([one.a, two.a]), torch.cat([one.b, two.b])
            joined[path] = state
        return joined

    def repeat(self, stack: Stack, times: int) -> Stack:
        repeated = {}
        for path, state in stack.items():
            rows = len(state.weights)
            repeated[path] = state.rows(torch.arange(rows, device=state.weights.device).repeat_interleave(times))
        return repeated

    def hooks(self) -> dict[str, Hook]:
        return {path: self._hook(path) for path in self.paths}

    def _hook(self, path: str) -> Hook:
        a, b = self.a[path], self.b[path]

        def add_mixes(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.current is None:
                return output
            x, state = inputs[0], self.current[path]
            if state.a is None and x.shape[1] > 1:  # a prefill: arithmetic decides
                state = RowsState(state.weights, *self._own_columns(path, state.weights))
            if state.a is not None:
                return output + torch.bmm(torch.bmm(x, rows_of(x, state.a)), rows_of(x, state.b))
            return output + ((x @ a.T) * rows_of(x, state.weights).unsqueeze(1)) @ b

        return add_mixes
