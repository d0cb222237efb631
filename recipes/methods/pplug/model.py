"""PPlug's user embedder: an input encoder, a projector and an instruction embedding that turn a
user's stored history vectors and the current input into soft tokens for a frozen LLM.

    x   = normalize(Enc_in(input))                  trainable copy of the behaviour encoder
    w_i = softmax_i(x . h_i)                        over the user's stored, frozen history vectors
    P   = sum_i w_i Proj(h_i)                       Proj = Linear -> GELU -> Linear
    I   = MLP(instruction vector)
    soft tokens [I; P], each scaled to the mean norm of the LLM's token embeddings

Ablations: mean pooling (w_i = 1/n) and no personal token (only I).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

POOLINGS = ("attention", "mean")


@dataclass
class EmbedderShape:
    """What builds an embedder of the right shape (stored in the plug-in's config)."""

    encoder_dim: int
    llm_dim: int
    pooling: str = "attention"
    personal: bool = True
    token_norm: float = 1.0
    history_cap: int = 512

    @property
    def n_soft(self) -> int:
        return 2 if self.personal else 1

    def as_config(self) -> dict:
        return asdict(self)


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class UserEmbedder(nn.Module):
    """The trainable part of PPlug; the sentence-transformers input encoder is a module of it."""

    def __init__(self, input_encoder: Any, shape: EmbedderShape) -> None:
        super().__init__()
        self.shape = shape
        self.input_encoder = input_encoder
        self.projector = _mlp(shape.encoder_dim, shape.llm_dim)
        self.instruction = nn.Parameter(torch.randn(shape.encoder_dim) * 0.02)
        self.instruction_mlp = _mlp(shape.encoder_dim, shape.llm_dim)

    @property
    def device(self) -> torch.device:
        return self.instruction.device

    def encode_inputs(self, texts: list[str]) -> torch.Tensor:
        """x = normalize(Enc_in(text)) for each input, with gradients when training."""
        encoder = self.input_encoder
        features = encoder.preprocess(texts) if hasattr(encoder, "preprocess") else encoder.tokenize(texts)
        features = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        embedded = self.input_encoder(features)["sentence_embedding"]
        return nn.functional.normalize(embedded.float(), dim=-1)

    def weights(self, inputs: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each history item's weight in the personal embedding: softmax(x . h) over real items, or uniform."""
        if self.shape.pooling == "mean":
            scores = torch.zeros(mask.shape, device=history.device)
        else:
            scores = torch.einsum("bd,bnd->bn", inputs, history)
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)  # no history: no weight

    def forward(self, texts: list[str], history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Soft tokens (batch, n_soft, llm_dim) for each input and its user's padded history (batch, n, d_enc)."""
        batch = len(texts)
        instruction = self.instruction_mlp(self.instruction)[None].expand(batch, -1)
        tokens = [instruction]
        if self.shape.personal:
            if self.shape.pooling == "mean":  # the input does not matter: skip the input encoder
                inputs = torch.zeros(batch, history.shape[-1], device=history.device)
            else:
                inputs = self.encode_inputs(texts)
            w = self.weights(inputs, history, mask)
            tokens.append(torch.einsum("bn,bnd->bd", w, self.projector(history)))
        soft = torch.stack(tokens, dim=1)
        return nn.functional.normalize(soft, dim=-1) * self.shape.token_norm

    # ---------- weights as bytes ----------

    @property
    def uses_input_encoder(self) -> bool:
        return self.shape.personal and self.shape.pooling == "attention"

    def to_bytes(self) -> bytes:
        """safetensors of the trained weights (the input encoder only when the input is encoded at all)."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if not self.uses_input_encoder:
            state = {k: v for k, v in state.items() if not k.startswith("input_encoder.")}
        return save_tensors(state)

    def load_bytes(self, data: bytes) -> None:
        tensors = load_tensors(data)
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if self.uses_input_encoder or not k.startswith("input_encoder.")]
        if missing or unexpected:
            raise ValueError(f"embedder weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


def pad_histories(histories: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack users' history vectors (n_i, d) into (batch, max n, d) with a mask of real items."""
    width = max(1, max(len(h) for h in histories))
    dim = next((h.shape[1] for h in histories if len(h)), 1)
    padded = np.zeros((len(histories), width, dim), dtype=np.float32)
    mask = np.zeros((len(histories), width), dtype=bool)
    for row, vectors in enumerate(histories):
        padded[row, : len(vectors)] = vectors
        mask[row, : len(vectors)] = True
    return torch.from_numpy(padded).to(device), torch.from_numpy(mask).to(device)


def recent(vectors: list[np.ndarray], cap: int) -> np.ndarray:
    """The `cap` most recent of a user's history vectors (the store keeps histories oldest first)."""
    kept = vectors[-cap:] if cap else vectors
    return np.stack(kept).astype(np.float32) if kept else np.zeros((0, 1), dtype=np.float32)


def describe(embedder: UserEmbedder) -> dict[str, Optional[int]]:
    """Parameter counts, for a plug-in's metrics."""
    encoder = sum(p.numel() for p in embedder.input_encoder.parameters())
    total = sum(p.numel() for p in embedder.parameters())
    return {"parameters": total, "input_encoder_parameters": encoder, "head_parameters": total - encoder}
