"""What each prompt of a mixed-user batch carries beyond its tokens: its own edit of the forward
pass (a user's LoRA, a user's steering vector) and its own soft tokens.

An edit keeps one state row per prompt. Generation stacks the rows of a batch, and as prompts
finish, leave or join a running batch the state follows them (`select`, `concat`); beam search
and seq2seq label ranking run a row several times side by side (`repeat`). Forward hooks read
`current` while `hooked()` is open.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from recipes.kit.hooks import Hook, forward_hooks
from recipes.kit.soft_prompts import SoftTokens


class RowEdit:
    """A per-prompt change of a frozen model's forward pass, made by forward hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.current: Any = None

    def stack(self, prompts: list[int]) -> Any:
        """The state of these prompts, in this order."""
        raise NotImplementedError

    def select(self, state: Any, index: torch.Tensor) -> Any:
        raise NotImplementedError

    def concat(self, first: Any, second: Any) -> Any:
        raise NotImplementedError

    def repeat(self, state: Any, times: int) -> Any:
        """Each row `times` times in a row (the decoder of seq2seq ranking sees a prompt once per label)."""
        raise NotImplementedError

    def hooks(self) -> dict[str, Hook]:
        """The forward hooks, by module path, that apply `current`."""
        raise NotImplementedError

    @contextmanager
    def hooked(self) -> Iterator["RowEdit"]:
        try:
            with forward_hooks(self.model, self.hooks()):
                yield self
        finally:
            self.current = None


def rows_of(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """`state` (rows, ...) widened to x's batch: beam search runs each row num_beams times, side by side."""
    return state if x.shape[0] == state.shape[0] else state.repeat_interleave(x.shape[0] // state.shape[0], 0)


@dataclass
class PerRow:
    """A batch's per-prompt edit and soft tokens (either may be None)."""

    edit: Optional[RowEdit] = None
    soft: Optional[SoftTokens] = None

    @contextmanager
    def hooked(self) -> Iterator[None]:
        if self.edit is None:
            yield
            return
        with self.edit.hooked():
            yield

    def use(self, rows: list[int]) -> None:
        """Point the edit at these prompts."""
        if self.edit is not None:
            self.edit.current = self.edit.stack(rows)


NOTHING = PerRow()
