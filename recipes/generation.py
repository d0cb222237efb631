"""Batched greedy generation: the one code path every method's prompts go through."""

from __future__ import annotations

from typing import Optional

import torch

from recipes.backbones import LLM
from recipes.progress import Progress, report


def render_prompt(llm: LLM, prompt: str) -> str:
    """A chat model gets the prompt as the user turn of its own template; others get it as is."""
    if llm.is_chat and not llm.is_seq2seq:
        messages = [{"role": "user", "content": prompt}]
        return llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


@torch.inference_mode()
def generate(
    llm: LLM,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_input_tokens: int = 1024,
    progress: Optional[Progress] = None,
) -> list[str]:
    """Greedy continuations of `prompts`, in order; batches are left-padded for causal LMs."""
    tick = report(progress)
    outputs: list[str] = []
    tokenizer = llm.tokenizer
    tick("generating", 0, len(prompts))
    for start in range(0, len(prompts), batch_size):
        texts = [render_prompt(llm, p) for p in prompts[start : start + batch_size]]
        encoded = tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_input_tokens,
            add_special_tokens=not llm.is_chat,
        ).to(llm.device)
        generated = llm.model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated if llm.is_seq2seq else generated[:, encoded["input_ids"].shape[1] :]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        tick("generating", len(outputs), len(prompts))
    return outputs
