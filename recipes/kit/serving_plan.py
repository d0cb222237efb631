"""A serving plan: what the LLM needs to answer a batch of prompts of mixed users with one method,
read from the store before any model loads and applied once it has.

Three things, any of them empty: a chain of plug-ins merged into the weights for every prompt
(a task LoRA), a per-prompt edit of the forward pass (each user's own LoRA, a steering vector),
and per-prompt soft tokens (PPlug). Every method's planner returns one of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from recipes import PersonaError
from recipes.kit.backbones import LLM
from recipes.kit.lora import LoraWeights
from recipes.kit.plugins import apply_chain
from recipes.kit.row_edits import PerRow, RowEdit
from recipes.kit.row_lora import RowLora
from recipes.kit.soft_prompts import SoftTokens
from store import Plugin, Query

EditMaker = Callable[[LLM, list[Query]], RowEdit]
SoftMaker = Callable[[LLM, list[Query]], SoftTokens]


@dataclass
class ServingPlan:
    chain: list[Plugin] = field(default_factory=list)
    edit: Optional[EditMaker] = None
    soft: Optional[SoftMaker] = None
    details: dict = field(default_factory=dict)

    def facts(self) -> dict:
        """What a run records of how it was served."""
        return {"plugins": [p.name for p in self.chain], **self.details}

    def prepare(self, llm: LLM, queries: list[Query]) -> PerRow:
        """Merge the chain into `llm` and make the queries' per-prompt edit and soft tokens (in query order)."""
        apply_chain(llm, self.chain)
        return PerRow(
            edit=None if self.edit is None else self.edit(llm, queries),
            soft=None if self.soft is None else self.soft(llm, queries),
        )


def per_prompt_loras(keys: list[str], load: Callable[[], dict[str, LoraWeights]], made_for: Optional[str]) -> EditMaker:
    """An edit giving prompt i the adapter `load()[keys[i]]`; the adapters were made for LLM `made_for`."""

    def make(llm: LLM, queries: list[Query]) -> RowEdit:
        require_llm(made_for, llm)
        adapters = load()
        return RowLora(llm.model, [adapters[key] for key in keys])

    return make


def require_llm(made_for: Optional[str], llm: LLM) -> None:
    """Per-user adapters serve only the LLM they were made for."""
    if made_for != llm.id:
        raise PersonaError(f"the per-user adapters were made for LLM '{made_for}', not '{llm.id}' (pass --llm {made_for})")
