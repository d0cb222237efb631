"""How long-running library functions report progress without printing."""

from __future__ import annotations

from typing import Callable, Optional

Progress = Callable[[str, int, int], None]
"""Called as progress(stage, done, total); the CLI renders it as a rich progress bar."""


def no_progress(stage: str, done: int, total: int) -> None:
    """The default: report nothing."""


def report(progress: Optional[Progress]) -> Progress:
    return progress or no_progress
