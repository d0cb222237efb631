"""How answers are decoded: greedy or beam search, repetition controls that look only at the
answer being written, a length limit tied to the input's length, and beam search's length
penalty (below 1 prefers shorter finished beams).

transformers' stock `repetition_penalty` and `no_repeat_ngram_size` also count the prompt's
tokens. On a task whose answer reuses the input (LaMP-7 paraphrases a tweet) that forbids the
very words the answer needs: measured on 100 LaMP-7 users with the bare SmolLM2, ROUGE-1 fell
from 0.339 (greedy) to 0.225 (no-repeat 3) and 0.088 (penalty 1.3). Here both only see the
tokens generated so far. (The settings are read by tasks and the CLI before any model loads, so
torch and transformers are imported only where logits are penalized.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

from recipes import PersonaError

if TYPE_CHECKING:
    import torch

LENGTH_SLACK = 8
"""Tokens allowed beyond `length_ratio` × the input's tokens (a short input still gets a few words)."""


@dataclass(frozen=True)
class Decoding:
    """Decoding settings: a task's defaults, overridable on `generate` and `evaluate`, and stored in
    each run's config so two runs can be told apart. Sampling is never used: answers are repeatable."""

    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    length_ratio: Optional[float] = None
    length_penalty: float = 1.0

    def validate(self) -> None:
        checks = [
            (self.num_beams >= 1, f"--beams must be at least 1, got {self.num_beams}"),
            (self.no_repeat_ngram_size >= 0, f"--no-repeat-ngram must not be negative, got {self.no_repeat_ngram_size}"),
            (self.repetition_penalty > 0, f"--repetition-penalty must be positive, got {self.repetition_penalty}"),
            (self.length_ratio is None or self.length_ratio > 0, f"--length-ratio must be positive, got {self.length_ratio}"),
            (self.length_penalty == 1.0 or self.num_beams > 1, "--length-penalty shapes beam search only: pass --beams N (N > 1) too"),
        ]
        for ok, message in checks:
            if not ok:
                raise PersonaError(message)

    def override(self, **changes: object) -> "Decoding":
        """These settings with the options a user gave (None: keep the task's)."""
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if v is not None})
        return Decoding(**values)

    @property
    def penalizes(self) -> bool:
        return self.no_repeat_ngram_size > 0 or self.repetition_penalty != 1.0

    def new_token_limit(self, max_new_tokens: int, input_tokens: int) -> int:
        """At most `max_new_tokens`, and with a length ratio at most ratio × the input's tokens + LENGTH_SLACK."""
        if self.length_ratio is None:
            return max_new_tokens
        return max(1, min(max_new_tokens, math.ceil(self.length_ratio * input_tokens) + LENGTH_SLACK))

    def penalize(self, generated: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        """Apply the repetition controls to each row's next-token logits, row i seeing only generated[i]."""
        if not self.penalizes:
            return logits
        import torch

        rows = []
        for tokens, row in zip(generated, logits):
            rows.append(self.penalize_rows(torch.tensor([tokens], dtype=torch.long, device=logits.device), row[None]))
        return torch.cat(rows)

    def penalize_rows(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The repetition controls for rows whose answers so far are equally long: `tokens` (rows, n)."""
        if tokens.shape[1] == 0:
            return scores
        from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

        if self.repetition_penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(float(self.repetition_penalty))(tokens, scores)
        if self.no_repeat_ngram_size > 0:
            scores = NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size)(tokens, scores)
        return scores


GREEDY = Decoding()
