"""Registry of LaMP tasks: names and which item fields form the document text."""

from __future__ import annotations

import re
from dataclasses import dataclass

from recipes import PersonaError


@dataclass(frozen=True)
class Task:
    """A LaMP task, or a custom task whose items carry their own `text`."""

    name: str
    doc_fields: tuple[str, ...]
    description: str

    def document(self, item: dict) -> str:
        """The text embedded and retrieved for one history item of this task."""
        parts = [str(item[f]).strip() for f in self.doc_fields if item.get(f) is not None]
        return " ".join(p for p in parts if p)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("LaMP-1", ("title", "abstract"), "citation identification"),
        Task("LaMP-2", ("description",), "movie tagging"),
        Task("LaMP-2N", ("text",), "news categorization"),
        Task("LaMP-3", ("text",), "product rating"),
        Task("LaMP-4", ("title", "text"), "news headline generation"),
        Task("LaMP-5", ("title", "abstract"), "scholarly title generation"),
        Task("LaMP-6", ("text",), "email subject generation"),
        Task("LaMP-7", ("text",), "tweet paraphrasing"),
    ]
}

CUSTOM = Task("custom", ("text",), "your own users.jsonl items")


def canonical_task_name(name: str) -> str:
    """'LaMP_7', 'lamp7', 'LaMP-7' -> 'LaMP-7'; names that are not LaMP's pass through unchanged."""
    match = re.fullmatch(r"lamp[-_ ]?(\d)([a-z]?)", name.strip(), flags=re.IGNORECASE)
    if not match:
        return name.strip()
    return f"LaMP-{match.group(1)}{match.group(2).upper()}"


def get_task(name: str) -> Task:
    """The registered LaMP task, or a custom task (items carry `text`) for any other name."""
    canonical = canonical_task_name(name)
    if canonical in TASKS:
        return TASKS[canonical]
    if canonical.startswith("LaMP-"):
        raise PersonaError(f"unknown LaMP task '{name}'; known: {', '.join(TASKS)}")
    if not canonical:
        raise PersonaError("task name is empty")
    return Task(canonical, CUSTOM.doc_fields, CUSTOM.description)
