"""Forward hooks for the length of a block: how per-row adapters, steering vectors, Per-Pcs
assembly and gated training change a frozen model's modules without copying it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

Hook = Callable[[torch.nn.Module, tuple, object], object]


@contextmanager
def forward_hooks(model: torch.nn.Module, hooks: dict[str, Hook]) -> Iterator[None]:
    """Each hook on the submodule at its path while the block runs; all removed afterwards, also on errors."""
    handles = [model.get_submodule(path).register_forward_hook(hook) for path, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
