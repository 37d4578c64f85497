"""FlexProjector: pool the vision grid to N tokens, then LayerNorm -> SwiGLU.

Pool first, then project (TokenFLEX): the MLP runs on N tokens, not on the full
grid, so its cost falls with N. The LayerNorm sits after pooling, as in the public
reference, so the MLP sees normalised features whatever N is (averaging more cells
shrinks feature variance). The same weights serve every N: there is no token-count
embedding.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flexproj.kernels.registry import check_backend_name, silu_mul, swiglu
from flexproj.pooling import Grid, check_token_count, pool_grid, target_grid

TokenSpec = int | tuple[int, int]

__all__ = ["FlexProjector", "SwiGLU", "TokenSpec"]


class SwiGLU(nn.Module):
    """``silu(x W1 + b1) * (x W2 + b2) W3 + b3`` with xformers' packed layout.

    ``w12`` holds the gate rows then the up rows (``(2*hidden, in)``), ``w3`` is
    ``(out, hidden)``; ``kernel`` picks the backend (see :mod:`flexproj.kernels`).

    While both layers are plain ``nn.Linear`` the backend gets their weights (the packed
    fast path). Once a wrapper replaces one (peft LoRA on ``w12``/``w3``, a quantised
    linear), the layers are called as modules, so the wrapper applies, and the backend
    runs only the elementwise middle.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, *, bias: bool = True, kernel: str = "auto"
    ) -> None:
        super().__init__()
        check_backend_name(kernel)
        self.kernel = kernel
        self.w12 = nn.Linear(in_dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.w12) is nn.Linear and type(self.w3) is nn.Linear:
            w12, w3 = self.w12, self.w3
            return swiglu(x, w12.weight, w12.bias, w3.weight, w3.bias, self.kernel)
        return self.w3(silu_mul(self.w12(x), self.kernel))


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class FlexProjector(nn.Module):
    """Variable-token vision projector: ``(B, H*W, in_dim) -> (B, N, out_dim)``.

    Args:
        in_dim: vision feature width ``C``.
        out_dim: LLM hidden width.
        hidden_dim: SwiGLU hidden width; default ``3 * in_dim`` (the public reference).
        kernel: SwiGLU backend: ``"auto"``, ``"eager"``, ``"xformers"``, ``"compile"``
            or ``"triton"``.
        bias: biases in the two linear layers.

    ``tokens`` is an int budget (the grid is :func:`flexproj.target_grid` of it, so
    at most that many tokens come out) or an explicit ``(h, w)`` target grid.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        kernel: str = "auto",
        *,
        bias: bool = True,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_dim = _positive_int(in_dim, "in_dim")
        self.out_dim = _positive_int(out_dim, "out_dim")
        self.hidden_dim = _positive_int(
            3 * in_dim if hidden_dim is None else hidden_dim, "hidden_dim"
        )
        self.bias = bias
        self.eps = eps
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.mlp = SwiGLU(in_dim, self.hidden_dim, out_dim, bias=bias, kernel=kernel)

    @property
    def kernel(self) -> str:
        return self.mlp.kernel

    @kernel.setter
    def kernel(self, name: str) -> None:
        check_backend_name(name)
        self.mlp.kernel = name

    def config(self) -> dict[str, Any]:
        """Constructor arguments (what :func:`flexproj.save_pretrained` records)."""
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "hidden_dim": self.hidden_dim,
            "bias": self.bias,
            "eps": self.eps,
        }

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, hidden_dim={self.hidden_dim}, kernel={self.kernel!r}"

    @staticmethod
    def output_grid(
        tokens: TokenSpec, grid: Sequence[int], *, allow_upsample: bool = False
    ) -> Grid:
        """The pooled grid ``(h, w)`` that ``tokens`` gives on ``grid``."""
        if isinstance(tokens, tuple):
            if len(tokens) != 2:
                raise ValueError(f"tokens as a grid must be (h, w), got {tokens!r}")
            h, w = (check_token_count(t) for t in tokens)
        else:
            h, w = target_grid(check_token_count(tokens), grid, allow_upsample=allow_upsample)
        # Under torch.compile a budget that changed between calls arrives as a SymInt
        # (automatic dynamic), and inductor cannot lower adaptive_avg_pool2d to a
        # symbolic size. operator.index specialises it: one guard, one graph per grid.
        return operator.index(h), operator.index(w)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm + SwiGLU on already-pooled tokens: ``(..., in_dim) -> (..., out_dim)``."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"FlexProjector expects features of width {self.in_dim}, got {x.shape[-1]} "
                f"(input shape {tuple(x.shape)})"
            )
        # LayerNorm and the matmuls run in the weights' dtype; AMP autocast still applies.
        return self.mlp(self.norm(x))

    def forward(
        self,
        x: torch.Tensor,
        tokens: TokenSpec,
        grid: Sequence[int] | None = None,
        *,
        drop_cls: bool = False,
        allow_upsample: bool = False,
    ) -> torch.Tensor:
        """Pool ``x (B, L, in_dim)`` to ``tokens`` and project: ``(B, n, out_dim)``.

        ``grid`` defaults to the square root of ``L``. A leading CLS token is never
        pooled silently: pass ``drop_cls=True`` to discard it, or strip it yourself.
        """
        if x.dim() != 3:
            raise ValueError(
                f"FlexProjector expects x of shape (B, L, in_dim), got {tuple(x.shape)}"
            )
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"FlexProjector expects features of width {self.in_dim}, got {x.shape[-1]}"
            )
        if drop_cls:
            x = x[:, 1:]
        src = self._source_grid(x.shape[1], grid)
        dst = self.output_grid(tokens, src, allow_upsample=allow_upsample)
        return self.project(pool_grid(x, src, dst, allow_upsample=allow_upsample))

    @staticmethod
    def _source_grid(length: int, grid: Sequence[int] | None) -> Grid:
        if grid is not None:
            H, W = int(grid[0]), int(grid[1])
            if length == H * W:
                return H, W
            hint = (
                " It has one extra token: a leading CLS? Pass drop_cls=True."
                if length == H * W + 1
                else ""
            )
            raise ValueError(f"x has {length} tokens but grid {H}x{W} holds {H * W}.{hint}")
        side = math.isqrt(length)
        if side * side == length:
            return side, side
        if math.isqrt(length - 1) ** 2 == length - 1:
            raise ValueError(
                f"x has {length} tokens = {math.isqrt(length - 1)}^2 + 1: that looks like a "
                "leading CLS token. Pass drop_cls=True to discard it (or grid=(H, W) if not)."
            )
        raise ValueError(f"cannot infer a square grid from {length} tokens; pass grid=(H, W)")
