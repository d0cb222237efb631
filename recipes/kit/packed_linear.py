"""The LLM's linear layers through oneDNN with prepacked weights while it generates on a CPU.

Decoding feeds every linear layer one token per row, a product of a few rows against a large
weight. There, MKL's sgemm behind `F.linear` is slow for 2 to 16 rows, and slow for the 49,152-word
output layer at any count; oneDNN with its weights reordered once is not. Measured on an AMD EPYC
(AVX2, float32, 2 threads, torch 2.13), milliseconds per call, F.linear / packed:

| rows | output layer 49152x576 | MLP up 1536x576 | MLP down 576x1536 | attention 576x576 |
|---|---|---|---|---|
| 1 | 10.8 / 6.0 | 0.127 / 0.129 | 0.117 / 0.132 | 0.055 / 0.081 |
| 2 | 26.9 / 8.5 | 0.250 / 0.123 | 0.231 / 0.123 | 0.102 / 0.076 |
| 16 | 25.0 / 11.5 | 0.406 / 0.298 | 0.427 / 0.345 | 0.176 / 0.160 |
| 128 | 74.1 / 49.5 | 1.41 / 1.35 | 1.38 / 1.49 | 0.53 / 0.58 |

So a call takes the packed weights when it has 2 to PACKED_MAX_ROWS rows, or a single row on a
weight of ALWAYS_PACKED elements or more (the output layer); prompts' prefill, hundreds of rows,
stays with F.linear. The same products in another summation order: answers can differ from
unpacked ones only where two tokens' logits tie to float32 rounding.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

PACKED_MAX_ROWS = 64
"""Past this many rows (a prompt's prefill) F.linear is as fast or faster (table above)."""
ALWAYS_PACKED = 1 << 22
"""Weights of at least this many elements take the packed path for one row too."""

_lock = threading.Lock()


def packing_applies(model: torch.nn.Module) -> bool:
    """Whether this torch build and the model's weights (float32 on a CPU) can use packed weights."""
    weight = next(model.parameters(), None)
    return (
        weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )  # fmt: skip


@contextmanager
def packed_linears(model: torch.nn.Module, batched: bool) -> Iterator[None]:
    """Inside the block, the model's linear layers run with packed weights where that is faster.

    `batched`: whether calls will see several rows (batches, beams); if not, only the layers that
    gain at one row are packed, since packing every weight costs about 0.4 s for 135M parameters.
    The weights are packed on entry (so what was merged into them before counts) and dropped on
    exit. A layer that already has a forward of its own (an enclosing or concurrent block's, or
    another library's hook) is left as it is, so blocks nest and each restores only what it
    swapped. Where gradients are on (training in another thread), a call takes F.linear: the
    packed path has none."""
    if not packing_applies(model):
        yield
        return
    with _lock:
        swapped = [
            module for module in model.modules()
            if type(module) is torch.nn.Linear and "forward" not in vars(module)
            and (batched or module.weight.numel() >= ALWAYS_PACKED)
        ]  # fmt: skip
        for module in swapped:
            module.forward = _packed_forward(module)
    try:
        yield
    finally:
        with _lock:
            for module in swapped:
                module.__dict__.pop("forward", None)  # the class's forward again


def _packed_forward(module: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    weight, bias = module.weight, module.bias
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    large = weight.numel() >= ALWAYS_PACKED

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > PACKED_MAX_ROWS or (rows == 1 and not large) or x.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

    return forward
