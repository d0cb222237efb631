"""What LoRA training, gate training and assembly learn from: a user's queries or history as examples."""

from __future__ import annotations

from recipes.lora_training import Example
from recipes.tasks import Task
from store import Behavior, Query


def query_examples(queries: list[Query]) -> list[Example]:
    """(prompt, gold) pairs: the task's own k=0 prompt and the user's answer."""
    return [Example(q.input, q.output) for q in queries if q.output is not None]


def history_examples(task: Task, history: list[Behavior]) -> list[Example]:
    """A user's history as training examples: in task format when an item has an input (its
    text being the user's output), else language modelling on the item's text."""
    examples = []
    for item in history:
        item_input = item.fields.get("input")
        if isinstance(item_input, str) and item_input.strip():
            output = item.fields.get("output")
            target = output if isinstance(output, str) and output.strip() else item.text
            examples.append(Example(task.item_prompt(item_input), target))
        else:
            examples.append(Example(None, item.text))
    return examples
