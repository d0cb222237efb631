"""k=0: the query's input alone, no history: the non-personal baseline every method is measured
against, and the prompt every model method answers unless a prompt method follows its '+'."""

from __future__ import annotations

from recipes.kit.prompts import PromptContext
from recipes.methods.registry import Method, register
from store import Query


def input_only(ctx: PromptContext, queries: list[Query]) -> tuple[list[str], dict]:
    return [q.input for q in queries], {}


K0 = register(Method(name="none", summary="k=0: the input alone, no history", needs="nothing", prompts=input_only))
