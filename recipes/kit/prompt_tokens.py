"""Rendering a prompt into token ids: the chat template, truncation, and the tokens that end an answer."""

from __future__ import annotations

from recipes.kit.backbones import LLM


def render_prompt(llm: LLM, prompt: str) -> str:
    """A chat model gets the prompt as the user turn of its own template; others get it as is."""
    if llm.is_chat and not llm.is_seq2seq:
        messages = [{"role": "user", "content": prompt}]
        return llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def prompt_token_ids(llm: LLM, prompt: str, max_input_tokens: int = 1024) -> list[int]:
    """Token ids of one rendered prompt; an over-long prompt keeps its beginning and the answer header."""
    tokenizer = llm.tokenizer
    ids = tokenizer(render_prompt(llm, prompt), add_special_tokens=not llm.is_chat)["input_ids"]
    if len(ids) <= max_input_tokens:
        return ids
    header = tokenizer(render_prompt(llm, ""), add_special_tokens=not llm.is_chat)["input_ids"]
    content = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    shortened = tokenizer.decode(content[: max(1, max_input_tokens - len(header))])
    return tokenizer(render_prompt(llm, shortened), add_special_tokens=not llm.is_chat)["input_ids"]


def stop_token_ids(llm: LLM) -> set[int]:
    """Tokens that end an answer: the tokenizer's eos and whatever the model's generation config lists."""
    stops = {llm.tokenizer.eos_token_id}
    configured = getattr(getattr(llm.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        stops.add(configured)
    elif configured:
        stops.update(configured)
    return {s for s in stops if s is not None}
