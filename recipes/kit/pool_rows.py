"""Per-row mixes of one shared set of LoRA pieces, applied once per batch.

Per-Pcs and PEFT retrieval give every user a weighted mix of the same pool's pieces
(sum_s w_s·B_s·A_s). Serving each row its own mixed adapter (`RowLora`) reads every row's A and B
at every decoding step: 16 rows of rank 24 move ~2.5x the bytes of the 19-sharer pool itself,
and the uniform-gates ablation (every sharer, rank S·r on every row) 16x. Here a module's pieces
are read once per batch: x·A_pool for all pieces some row uses, scaled per row by that row's
piece weights (zero for pieces it did not choose), then ·B_pool. The same sum, so the same answers.
"""

from __future__ import annotations

import torch

from recipes import PersonaError
from recipes.kit.hooks import Hook
from recipes.kit.lora import module_shapes
from recipes.kit.row_edits import RowEdit, rows_of

Pieces = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per module path: the pieces' A of shape (S, r, in) and B·scale of shape (S, out, r)."""
Mix = dict[str, torch.Tensor]
"""Per module path: one weight per piece, shape (S,); zero for a piece not chosen."""
Stack = dict[str, torch.Tensor]
"""Per module path: the rows' piece weights, each repeated over the piece's rank: (rows, S·r)."""


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
        for path in self.paths:
            a, b = pieces[path]
            if a.shape[2] != shapes[path][1] or b.shape[1] != shapes[path][0]:
                raise PersonaError(f"pool module '{path}' is {b.shape[1]}×{a.shape[2]} but the LLM's is {shapes[path][0]}×{shapes[path][1]}")
            weighted = torch.stack([mix[path] != 0 for mix in mixes if path in mix]).any(0)
            self.used[path] = used = weighted.nonzero().flatten()
            self.rank[path] = a.shape[1]
            self.a[path] = a[used].flatten(0, 1).T.contiguous().to(self.device, self.dtype)  # (in, S·r)
            self.b[path] = b[used].permute(0, 2, 1).flatten(0, 1).contiguous().to(self.device, self.dtype)  # (S·r, out)
        self.mixes = mixes

    def stack(self, prompts: list[int]) -> Stack:
        stacked: Stack = {}
        for path in self.paths:
            used = self.used[path]
            rows = [self.mixes[i][path][used] if path in self.mixes[i] else torch.zeros(len(used)) for i in prompts]
            stacked[path] = torch.stack(rows).float().repeat_interleave(self.rank[path], 1).to(self.device, self.dtype)
        return stacked

    def select(self, stack: Stack, index: torch.Tensor) -> Stack:
        return {path: w[index] for path, w in stack.items()}

    def concat(self, first: Stack, second: Stack) -> Stack:
        return {path: torch.cat([first[path], second[path]]) for path in first}

    def repeat(self, stack: Stack, times: int) -> Stack:
        return {path: w.repeat_interleave(times, 0) for path, w in stack.items()}

    def hooks(self) -> dict[str, Hook]:
        return {path: self._hook(path) for path in self.paths}

    def _hook(self, path: str) -> Hook:
        a, b = self.a[path], self.b[path]

        def add_mixes(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.current is None:
                return output
            x = inputs[0]
            weights = rows_of(x, self.current[path]).unsqueeze(1)  # (rows, 1, S·r)
            return output + ((x @ a) * weights) @ b

        return add_mixes
