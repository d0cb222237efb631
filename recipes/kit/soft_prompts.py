"""Soft tokens: vectors that take the place of token embeddings in a prompt (PPlug's instruction and
personal embeddings). They open the user turn of a chat model (right after its template's header)
and start the input of any other model. Generation, label ranking and training all place them
the same way, through the functions here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from recipes.kit.backbones import LLM
from recipes.kit.prompt_tokens import prompt_token_ids, render_prompt

_MARK = "\u2063persona-soft\u2063"


@dataclass
class SoftTokens:
    """`vectors[i]` (n, d) go in front of prompt i's content; one row per prompt."""

    vectors: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.vectors.shape[1])

    def rows(self, rows: list[int]) -> torch.Tensor:
        return self.vectors[rows]


def soft_start(llm: LLM) -> int:
    """How many template tokens come before the prompt's content (where the soft tokens go)."""
    if not llm.is_chat or llm.is_seq2seq:
        probe = llm.tokenizer("x", add_special_tokens=True)["input_ids"]
        bare = llm.tokenizer("x", add_special_tokens=False)["input_ids"]
        return 1 if len(probe) > len(bare) and probe[1:] == bare[: len(probe) - 1] else 0
    rendered = render_prompt(llm, _MARK)
    header = rendered[: rendered.index(_MARK)]
    return len(llm.tokenizer(header, add_special_tokens=False)["input_ids"])


def soft_prompt_ids(llm: LLM, prompt: str, n_soft: int, max_input_tokens: int = 1024, start: Optional[int] = None) -> tuple[list[int], int]:
    """The prompt's token ids with `n_soft` placeholder ids where the soft tokens go, and where they start."""
    ids = prompt_token_ids(llm, prompt, max(8, max_input_tokens - n_soft))
    at = soft_start(llm) if start is None else start
    return ids[:at] + [llm.tokenizer.pad_token_id] * n_soft + ids[at:], at


def embed_with_soft(llm: LLM, input_ids: torch.Tensor, vectors: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Token embeddings of `input_ids` (batch, width) with row r's soft tokens `vectors[r]` written at
    positions offsets[r] .. offsets[r] + n (gradients flow into `vectors`)."""
    embeddings = llm.model.get_input_embeddings()(input_ids)
    n = vectors.shape[1]
    rows = torch.arange(len(offsets), device=input_ids.device).repeat_interleave(n)
    columns = (torch.tensor(offsets, device=input_ids.device)[:, None] + torch.arange(n, device=input_ids.device)).flatten()
    embeddings = embeddings.clone()
    embeddings[rows, columns] = vectors.reshape(-1, vectors.shape[-1]).to(embeddings.dtype)
    return embeddings


def token_norm(llm: LLM) -> float:
    """The mean norm of the LLM's own token embeddings: soft tokens are scaled to it."""
    weight = llm.model.get_input_embeddings().weight
    return float(weight.detach().float().norm(dim=-1).mean())
