"""Reference SwiGLU in plain PyTorch ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_eager(
    x: torch.Tensor,
    w12: torch.Tensor,
    b12: torch.Tensor | None,
    w3: torch.Tensor,
    b3: torch.Tensor | None,
) -> torch.Tensor:
    """``x (..., C) -> (..., out)``; ``w12 (2*hidden, C)`` holds gate rows then up rows."""
    return F.linear(silu_mul_eager(F.linear(x, w12, b12)), w3, b3)


def silu_mul_eager(h: torch.Tensor) -> torch.Tensor:
    """The elementwise middle: ``h (..., 2*hidden)`` (gate then up) ``-> (..., hidden)``."""
    a, b = h.chunk(2, dim=-1)  # (..., hidden) each
    return F.silu(a) * b
