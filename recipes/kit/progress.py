"""How long-running library functions report progress without printing."""

from __future__ import annotations

import inspect
from typing import Callable, Optional

Progress = Callable[..., None]
"""Called as progress(stage, done, total) or progress(stage, done, total, note=...) where there
is more to say (a trainer's s/step, tokens/s and loss); the CLI renders it as a rich progress bar."""


def no_progress(stage: str, done: int, total: int, note: str = "") -> None:
    """The default: report nothing."""


def report(progress: Optional[Progress]) -> Progress:
    """A callback that takes a note whether or not the caller's does (a 3-argument one gets none)."""
    if progress is None:
        return no_progress
    if _takes_note(progress):
        return progress
    return lambda stage, done, total, note="": progress(stage, done, total)


def _takes_note(callback: Callable[..., None]) -> bool:
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "note" for p in parameters)
