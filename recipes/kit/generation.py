"""Batched generation and label ranking: the one code path every method's prompts go through.

Prompts are sorted by length before batching (less padding) and answers come back in the
caller's order. Greedy decoding of causal LMs is a loop of our own over a left-padded batch with
a KV cache that grows in place, dropping rows from the batch as soon as they finish, so one long answer does not keep
a whole batch of finished rows busy. Beam search, and every seq2seq LM, use transformers'
generate batch by batch. Either way a Decoding's repetition controls see only the answer's own
tokens, and each row may have its own token limit. On a CPU the linear layers run with prepacked
weights while decoding (`packed_linear`): at 2-16 rows MKL's products are up to 3x slower.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from transformers import DynamicCache, LogitsProcessor
from transformers.cache_utils import DynamicLayer

from recipes.kit.backbones import LLM, with_cache
from recipes.kit.decoding import GREEDY, Decoding
from recipes.kit.progress import Progress, report
from recipes.kit.lora import zero_pad
from recipes.kit.packed_linear import packed_linears
from recipes.kit.prompt_tokens import prompt_token_ids, stop_token_ids
from recipes.kit.row_edits import NOTHING, PerRow
from recipes.kit.soft_prompts import SoftTokens, embed_with_soft, soft_prompt_ids, soft_start



def _length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _left_padded(llm: LLM, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    pad = llm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=llm.device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=llm.device)
    return ids, mask


@torch.inference_mode()
def generate(
    llm: LLM,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_input_tokens: int = 1024,
    progress: Optional[Progress] = None,
    stage: str = "generating",
    per_row: PerRow = NOTHING,
    decoding: Decoding = GREEDY,
    limits: Optional[list[int]] = None,
) -> list[str]:
    """Answers to `prompts` decoded as `decoding` says, in the order given (progress is reported under `stage`).

    Prompt i gets at most limits[i] new tokens (default: max_new_tokens each). `per_row` gives
    prompt i its own edit of the forward pass (its user's adapter or steering vector) and its own
    soft tokens (soft.vectors[i]); rows of different users share every batch."""
    decoding.validate()
    tick = report(progress)
    encoded, starts = encode_prompts(llm, prompts, max_input_tokens, per_row.soft)
    limits = limits if limits is not None else [max_new_tokens] * len(prompts)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} token limits for {len(prompts)} prompts")
    outputs: list[str] = [""] * len(prompts)
    done = 0
    tick(stage, 0, len(prompts))

    def finish(row: int, tokens: list[int]) -> None:
        nonlocal done
        outputs[row] = llm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        done += 1
        tick(stage, done, len(prompts))

    order = [i for batch in _length_sorted_batches([len(e) for e in encoded], len(encoded) or 1) for i in batch]
    batched = (batch_size > 1 and len(prompts) > 1) or decoding.num_beams > 1
    with per_row.hooked(), packed_linears(llm.model, batched):
        if llm.is_seq2seq or decoding.num_beams > 1:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                per_row.use(rows)
                answers = _transformers_generate(llm, [encoded[i] for i in rows], max(limits[i] for i in rows), decoding, _Soft.of(per_row.soft, starts, rows))
                for row, tokens in zip(rows, answers):
                    finish(row, tokens[: limits[row]])
        else:
            _greedy_causal(llm, encoded, order, batch_size, limits, finish, per_row, starts, decoding)
    return outputs


def encode_prompts(
    llm: LLM, prompts: list[str], max_input_tokens: int, soft: Optional[SoftTokens] = None
) -> tuple[list[list[int]], list[int]]:
    """Token ids of every prompt, with placeholders for its soft tokens when there are some, and
    where in each prompt they start."""
    if soft is None:
        return [prompt_token_ids(llm, p, max_input_tokens) for p in prompts], [0] * len(prompts)
    if len(soft.vectors) != len(prompts):
        raise ValueError(f"{len(soft.vectors)} rows of soft tokens for {len(prompts)} prompts")
    start = soft_start(llm)
    pairs = [soft_prompt_ids(llm, p, soft.count, max_input_tokens, start) for p in prompts]
    return [ids for ids, _ in pairs], [at for _, at in pairs]


class _Soft:
    """The soft tokens of some rows of a batch and where each row's start in its unpadded ids."""

    def __init__(self, vectors: torch.Tensor, starts: list[int]) -> None:
        self.vectors, self.starts = vectors, starts

    @staticmethod
    def of(soft: Optional[SoftTokens], starts: list[int], rows: list[int]) -> Optional["_Soft"]:
        return None if soft is None else _Soft(soft.rows(rows), [starts[r] for r in rows])

    def inputs(self, llm: LLM, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """inputs_embeds for a padded batch whose prompts begin where prompt_mask first has a 1."""
        first = prompt_mask.int().argmax(-1).tolist()
        offsets = [f + s for f, s in zip(first, self.starts)]
        return {"inputs_embeds": embed_with_soft(llm, input_ids, self.vectors.to(llm.device), offsets)}


def _inputs(llm: LLM, input_ids: torch.Tensor, prompt_mask: torch.Tensor, soft: Optional[_Soft]) -> dict[str, torch.Tensor]:
    return {"input_ids": input_ids} if soft is None else soft.inputs(llm, input_ids, prompt_mask)


class _Rows:
    """Rows being decoded together: KV cache, left-padded attention mask, next position, last logits,
    and each row's edit state when rows carry their own."""

    def __init__(self, llm: LLM, batch: list[list[int]], rows: list[int], per_row: PerRow = NOTHING, starts: Optional[list[int]] = None) -> None:
        input_ids, self.mask = _left_padded(llm, batch)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.llm, self.rows = llm, list(rows)
        self.edit = per_row.edit
        self.edit_rows = self.edit.stack(self.rows) if self.edit is not None else None
        soft = _Soft.of(per_row.soft, starts or [], self.rows)
        self.cache = _growing_cache(llm)
        self.cache_argument = with_cache(llm.model, self.cache)  # the same cache object for this batch's life
        self._use_edit()
        self.logits = llm.model(
            **_inputs(llm, input_ids, self.mask, soft), attention_mask=self.mask, position_ids=positions,
            **self.cache_argument, use_cache=True, logits_to_keep=1,
        ).logits[:, -1]  # fmt: skip
        self.next_position = positions[:, -1] + 1

    def _use_edit(self) -> None:
        if self.edit is not None:
            self.edit.current = self.edit_rows

    def can_join(self) -> bool:
        """Joining needs plain growing caches (their tensors can be padded and concatenated)."""
        return all(type(layer) is GrowingLayer for layer in self.cache.layers)

    def join(self, other: "_Rows") -> None:
        """Add other's rows to this batch: the shorter cache is left-padded, so every row stays left-padded."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(other.mask, width, -1)])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows
        if self.edit is not None:
            self.edit_rows = self.edit.concat(self.edit_rows, other.edit_rows)

    def keep(self, slots: list[int]) -> None:
        """Keep only these slots, and drop cache columns that are padding in every remaining row."""
        if len(slots) < len(self.rows):
            index = torch.tensor(slots, device=self.llm.device)
            self.cache.batch_select_indices(index)
            self.mask, self.next_position, self.logits = self.mask[index], self.next_position[index], self.logits[index]
            self.rows = [self.rows[s] for s in slots]
            if self.edit is not None:
                self.edit_rows = self.edit.select(self.edit_rows, index)
            first = int(self.mask.any(0).int().argmax())
            if first > 0 and self.can_join():
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
                self.mask = self.mask[:, first:]

    def step(self, tokens: torch.Tensor) -> None:
        """Feed one token per row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self._use_edit()
        self.logits = self.llm.model(
            input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_position[:, None],
            **self.cache_argument, use_cache=True,
        ).logits[:, -1]  # fmt: skip
        self.next_position = self.next_position + 1


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with room for SPARE more tokens:
    a decoding step writes its one column in place, where DynamicLayer copies the whole cache
    (at batch 16 that copying took ~7% of generation). Whatever replaces the tensors (rows
    leaving or joining, padding trimmed) is copied into fresh buffers at the next step."""

    SPARE = 32

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.key_buffer = self.value_buffer = None
        used = self.get_seq_length()
        width = used + key_states.shape[-2]
        if not self._in_buffers(width):
            self.key_buffer, self.value_buffer = (_with_room(t, key_states, used, width + self.SPARE) for t in (self.keys, self.values))
        self.key_buffer[..., used:width, :] = key_states
        self.value_buffer[..., used:width, :] = value_states
        self.keys, self.values = self.key_buffer[..., :width, :], self.value_buffer[..., :width, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep these rows, room and all: one copy, where selecting the views and re-buffering at
        the next step would make two."""
        used = self.get_seq_length()
        if not used or not self._in_buffers(used):
            super().batch_select_indices(indices)
            return
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.keys, self.values = self.key_buffer[..., :used, :], self.value_buffer[..., :used, :]

    def _in_buffers(self, width: int) -> bool:
        """Whether keys and values are still the buffers' own first columns and `width` tokens fit."""
        buffers = (self.key_buffer, self.value_buffer)
        return all(
            buffer is not None and tensor.data_ptr() == buffer.data_ptr() and tensor.shape[:2] == buffer.shape[:2] and width <= buffer.shape[-2]
            for tensor, buffer in zip((self.keys, self.values), buffers)
        ) if self.keys.numel() else False  # fmt: skip


def _with_room(current: torch.Tensor, like: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    buffer = like.new_empty(*like.shape[:2], capacity, like.shape[-1])
    if used:
        buffer[..., :used, :] = current
    return buffer


def _growing_cache(llm: LLM) -> DynamicCache:
    """A DynamicCache whose full-attention layers grow in place (see GrowingLayer)."""
    cache = DynamicCache(config=llm.model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    return zero_pad(tensor, width, dim, left=True)


def _greedy_causal(
    llm: LLM,
    encoded: list[list[int]],
    order: list[int],
    batch_size: int,
    limits: list[int],
    finish: Callable[[int, list[int]], None],
    per_row: PerRow = NOTHING,
    starts: Optional[list[int]] = None,
    decoding: Decoding = GREEDY,
) -> None:
    """Greedy decoding with continuous batching: a finished row leaves the batch at once, and when a
    quarter of the batch is free, waiting prompts are prefilled and join the rows still decoding.
    Row i stops after limits[i] tokens; the repetition controls see each row's own answer only."""
    stops = stop_token_ids(llm)
    pending = list(order)
    answers: dict[int, list[int]] = {}
    live: _Rows | None = None
    refill_at = max(1, batch_size // 4)
    while pending or live is not None:
        free = batch_size - (len(live.rows) if live else 0)
        if pending and (live is None or (free >= refill_at and live.can_join())):
            admitted, pending = pending[:free], pending[free:]
            fresh = _Rows(llm, [encoded[i] for i in admitted], admitted, per_row, starts)
            answers.update({row: [] for row in admitted})
            if live is None:
                live = fresh
            else:
                live.join(fresh)
        tokens = decoding.penalize([answers[row] for row in live.rows], live.logits).argmax(-1)
        keep = []
        for slot, (row, token) in enumerate(zip(live.rows, tokens.tolist())):
            if token not in stops:
                answers[row].append(token)
            if token in stops or len(answers[row]) >= limits[row]:
                finish(row, answers.pop(row))
            else:
                keep.append(slot)
        if not keep:
            live = None
            continue
        live.keep(keep)
        live.step(tokens[torch.tensor(keep, device=llm.device)] if len(keep) < len(tokens) else tokens)


class GeneratedOnly(LogitsProcessor):
    """A logits processor for transformers' `generate` that applies a Decoding's repetition controls
    to the tokens after the first `prompt_width` columns only (the prompt, or a decoder's start token)."""

    def __init__(self, decoding: Decoding, prompt_width: int) -> None:
        self.decoding, self.prompt_width = decoding, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return self.decoding.penalize_rows(input_ids[:, self.prompt_width :], scores)


def _transformers_generate(
    llm: LLM, batch: list[list[int]], max_new_tokens: int, decoding: Decoding, soft: Optional[_Soft] = None
) -> list[list[int]]:
    """One batch through transformers' generate (greedy or beam search, never sampling): each row's
    answer tokens up to its first stop token. A causal prompt is left-padded (the answer follows
    it in the output), a seq2seq decoder starts from its start token; the repetition controls
    skip both."""
    tokenizer = llm.tokenizer
    if llm.is_seq2seq:
        encoded = tokenizer.pad({"input_ids": batch}, return_tensors="pt").to(llm.device)
        input_ids, mask = encoded["input_ids"], encoded["attention_mask"]
        inputs = _inputs(llm, input_ids, mask, soft)
        skip = 1
    else:
        input_ids, mask = _left_padded(llm, batch)
        inputs = {"input_ids": input_ids, **({} if soft is None else soft.inputs(llm, input_ids, mask))}
        skip = input_ids.shape[1]
    generated = llm.model.generate(
        **inputs, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=decoding.num_beams,
        logits_processor=[GeneratedOnly(decoding, skip)] if decoding.penalizes else None,
        pad_token_id=tokenizer.pad_token_id, early_stopping=decoding.num_beams > 1,
        **({"length_penalty": decoding.length_penalty} if decoding.num_beams > 1 else {}),
    )  # fmt: skip
    stops = stop_token_ids(llm) | {tokenizer.pad_token_id}
    answers = []
    for row in generated[:, skip:].tolist():
        ends = [i for i, t in enumerate(row) if t in stops]
        answers.append(row[: ends[0]] if ends else row)
    return answers


# ---------- answering from a label set by log-likelihood ----------


def label_token_ids(llm: LLM, answer: str) -> list[int]:
    """The tokens of one candidate answer as the model would write it."""
    return llm.tokenizer(answer, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def label_logprobs(
    llm: LLM,
    prompts: list[str],
    labels: list[str],
    batch_size: int = 8,
    max_input_tokens: int = 1024,
    progress: Optional[Progress] = None,
    per_row: PerRow = NOTHING,
) -> torch.Tensor:
    """log P(answer | prompt) for every prompt and candidate answer, shape (prompts, labels).

    Answers are scored as written (sum of token log-probabilities, no end token), so they
    should be in the form the prompt invites, e.g. quoted when the prompt's examples quote
    their labels. Causal LMs score all candidates of a batch in one forward pass (each sees
    only the prompt and itself); seq2seq LMs run the encoder once per prompt.
    """
    tick = report(progress)
    encoded, starts = encode_prompts(llm, prompts, max_input_tokens, per_row.soft)
    label_ids = [label_token_ids(llm, label) for label in labels]
    scores = torch.zeros(len(prompts), len(labels))
    done = 0
    tick("ranking labels", 0, len(prompts))
    with per_row.hooked():
        for rows in _length_sorted_batches([len(e) for e in encoded], batch_size):
            batch = [encoded[i] for i in rows]
            per_row.use(rows)
            soft_rows = _Soft.of(per_row.soft, starts, rows)
            if llm.is_seq2seq:
                score = _score_seq2seq(llm, batch, label_ids, per_row, soft_rows)
            else:
                score = _score_causal(llm, batch, label_ids, soft_rows)
            scores[rows] = score.float().cpu()
            done += len(rows)
            tick("ranking labels", done, len(prompts))
    return scores


def _label_matrix(llm: LLM, label_ids: list[list[int]], repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded label tokens for `repeats` prompts (label-major within a prompt) and their validity mask."""
    width = max(len(ids) for ids in label_ids)
    pad = llm.tokenizer.pad_token_id
    one = torch.tensor([ids + [pad] * (width - len(ids)) for ids in label_ids], device=llm.device)
    valid = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in label_ids], device=llm.device)
    return one.repeat(repeats, 1), valid.repeat(repeats, 1)


def _score_causal(llm: LLM, batch: list[list[int]], label_ids: list[list[int]], soft: Optional[_Soft] = None) -> torch.Tensor:
    """All labels of a batch in one forward pass: each row is [left padding, prompt, label 1, …, label L],
    and a 4-D mask lets every label see the prompt and its own earlier tokens only, with positions
    restarting after the prompt, so no prompt is run or cached more than once."""
    model = llm.model
    input_ids, prompt_mask = _left_padded(llm, batch)
    rows, width = input_ids.shape
    flat = [t for ids in label_ids for t in ids]
    starts = [width + sum(len(ids) for ids in label_ids[:j]) for j in range(len(label_ids))]
    total = width + len(flat)
    ids = torch.cat([input_ids, torch.tensor(flat, device=llm.device).expand(rows, -1)], dim=1)
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    label_positions = torch.tensor(
        [t for ids_ in label_ids for t in range(len(ids_))], device=llm.device
    ) + prompt_positions[:, -1:] + 1  # fmt: skip
    positions = torch.cat([prompt_positions, label_positions], dim=1)
    segment = torch.zeros(total, dtype=torch.long, device=llm.device)
    for j, (start, ids_) in enumerate(zip(starts, label_ids)):
        segment[start : start + len(ids_)] = j + 1
    causal = torch.ones(total, total, dtype=torch.bool, device=llm.device).tril()
    same_label_or_prompt_key = (segment[None, :] == 0) | (segment[None, :] == segment[:, None])
    allowed = causal & same_label_or_prompt_key
    key_valid = torch.cat([prompt_mask.bool(), torch.ones(rows, len(flat), dtype=torch.bool, device=llm.device)], dim=1)
    allowed = allowed[None] & key_valid[:, None, :]
    allowed |= torch.eye(total, dtype=torch.bool, device=llm.device)[None]  # padding rows attend to themselves
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(rows, 1, total, total, dtype=dtype, device=llm.device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    inputs = _inputs(llm, ids, torch.cat([prompt_mask, prompt_mask.new_zeros(rows, len(flat))], dim=1), soft)
    logits = model(**inputs, attention_mask=mask, position_ids=positions, logits_to_keep=len(flat) + 1).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # position p of logits predicts token p+1 - (width - 1)
    scores = torch.zeros(rows, len(label_ids), device=llm.device)
    for j, (start, ids_) in enumerate(zip(starts, label_ids)):
        sources = [0] + [start - width + t for t in range(1, len(ids_))]
        picked = logprobs[:, sources, :].gather(-1, torch.tensor(ids_, device=llm.device).expand(rows, -1)[..., None])
        scores[:, j] = picked.squeeze(-1).sum(-1)
    return scores


def _score_seq2seq(
    llm: LLM, batch: list[list[int]], label_ids: list[list[int]], per_row: PerRow = NOTHING, soft: Optional[_Soft] = None
) -> torch.Tensor:
    model = llm.model
    n_labels = len(label_ids)
    encoded = llm.tokenizer.pad({"input_ids": batch}, return_tensors="pt").to(llm.device)
    mask = encoded["attention_mask"]
    hidden = model.get_encoder()(**_inputs(llm, encoded["input_ids"], mask, soft), attention_mask=mask).last_hidden_state.repeat_interleave(n_labels, 0)
    edit = per_row.edit
    if edit is not None and edit.current is not None:  # the decoder sees every prompt once per label
        edit.current = edit.repeat(edit.current, n_labels)
    labels, valid = _label_matrix(llm, label_ids, len(batch))
    start = torch.full((labels.shape[0], 1), model.config.decoder_start_token_id, device=llm.device)
    logits = model(
        encoder_outputs=(hidden,), attention_mask=encoded["attention_mask"].repeat_interleave(n_labels, 0),
        decoder_input_ids=torch.cat([start, labels[:, :-1]], dim=1),
    ).logits  # fmt: skip
    token_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    return (token_logprobs * valid).sum(-1).view(len(batch), n_labels)
