"""Grid pooling: average a vision encoder's patch grid down to N tokens.

The method is *adaptive average pooling* (the TokenFLEX paper's choice and
``torch.nn.functional.adaptive_avg_pool2d``): output cell ``(i, j)`` of an
``h x w`` target is the mean of source rows ``floor(i*H/h) .. ceil((i+1)*H/h)-1``
and the same for columns. When ``h`` divides ``H`` (and ``w`` divides ``W``) the
bins tile the grid exactly and the grid mean is preserved; otherwise neighbouring
bins overlap by one row or column (27x27 -> 8x8, for instance). We chose this over
the public reference's "bilinear resize to a multiple, then average" because it is
a single well-tested kernel on every device and dtype, and it is the identity when
the target equals the grid.

Token layout everywhere is row-major: token ``r*W + c`` is grid cell ``(r, c)``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Grid = tuple[int, int]

__all__ = ["Grid", "pool_grid", "pool_packed", "target_grid"]


def _check_grid(grid: Sequence[int], name: str) -> Grid:
    if len(grid) != 2 or any(isinstance(g, (bool, float)) for g in grid):
        raise TypeError(f"{name} must be a pair of ints (rows, cols), got {grid!r}")
    try:
        # operator.index, not int(): under torch.compile a grid that changed between
        # calls arrives as a SymInt, and index() specialises it (one guard per grid)
        # where inductor cannot lower adaptive_avg_pool2d to a symbolic size.
        h, w = operator.index(grid[0]), operator.index(grid[1])
    except TypeError:
        raise TypeError(f"{name} must be a pair of ints (rows, cols), got {grid!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {grid!r}")
    return h, w


def check_token_count(tokens: object) -> int:
    """Validate a token budget: a positive Python int (bools and floats are rejected)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise TypeError(f"tokens must be a positive int, got {tokens!r} ({type(tokens).__name__})")
    if tokens <= 0:
        raise ValueError(f"tokens must be a positive int, got {tokens}")
    return tokens


def target_grid(tokens: int, grid: Sequence[int], *, allow_upsample: bool = False) -> Grid:
    """The ``(h, w)`` grid that ``tokens`` vision tokens buy on a source ``grid``.

    Rule: ``w = round(h * W / H)`` (half up; the source aspect ratio, at least 1, and
    at most ``tokens // h``) and ``h`` is
    the largest row count with ``h * w <= tokens``. A square grid therefore gets
    ``isqrt(tokens)`` per side (24x24 at 144 -> 12x12; 27x27 at 64 -> 8x8), and a
    16x24 grid at 96 gets 8x12. Without ``allow_upsample`` the result never exceeds
    the source: a budget of at least ``H*W`` returns ``grid`` itself.
    """
    tokens = check_token_count(tokens)
    H, W = _check_grid(grid, "grid")
    if not allow_upsample and tokens >= H * W:
        return H, W

    def aspect_width(h: int) -> int:  # round(h * W / H), half up, in integers
        return max(1, (2 * h * W + H) // (2 * H))

    # h * aspect_width(h) is non-decreasing in h: walk up while the next row fits.
    h = 1
    limit = tokens if allow_upsample else H
    while h < limit and (h + 1) * aspect_width(h + 1) <= tokens:
        h += 1
    w = min(aspect_width(h), tokens // h)  # a very wide grid may not fit even one row
    return h, w


def pool_grid(
    x: torch.Tensor,
    grid: Sequence[int],
    target: Sequence[int],
    *,
    allow_upsample: bool = False,
) -> torch.Tensor:
    """Adaptive-average-pool row-major grid tokens: ``(B, H*W, C) -> (B, h*w, C)``.

    ``target`` larger than ``grid`` in either direction raises unless
    ``allow_upsample=True`` (then cells are repeated, as adaptive pooling does).
    Works for any float dtype and device, and is differentiable.
    """
    H, W = _check_grid(grid, "grid")
    h, w = _check_grid(target, "target")
    if x.dim() != 3:
        raise ValueError(f"pool_grid expects x of shape (B, H*W, C), got {tuple(x.shape)}")
    B, L, C = x.shape
    if L != H * W:
        raise ValueError(
            f"x has {L} tokens but grid {H}x{W} needs {H * W}; pass the grid the tokens were laid out on"
        )
    if (h > H or w > W) and not allow_upsample:
        raise ValueError(
            f"target grid {h}x{w} is larger than the source grid {H}x{W}; pooling only "
            "reduces tokens. Ask for fewer tokens, or pass allow_upsample=True to repeat cells."
        )
    if (h, w) == (H, W):
        return x
    # (B, H*W, C) -> (B, C, H, W) -> (B, C, h, w) -> (B, h*w, C)
    img = x.transpose(1, 2).reshape(B, C, H, W)
    pooled = F.adaptive_avg_pool2d(img, (h, w))
    return pooled.reshape(B, C, h * w).transpose(1, 2)


def pool_packed(
    x: torch.Tensor,
    grids: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    allow_upsample: bool = False,
) -> torch.Tensor:
    """Pool many images packed along one axis: ``(sum H_i*W_i, C) -> (sum h_i*w_i, C)``.

    This is Qwen-VL's layout (all images of a batch concatenated, each row-major).
    Runs of consecutive images with the same grid and target are pooled in one call.
    """
    if x.dim() != 2:
        raise ValueError(f"pool_packed expects x of shape (sum H*W, C), got {tuple(x.shape)}")
    if len(grids) != len(targets):
        raise ValueError(f"got {len(grids)} grids but {len(targets)} targets")
    src = [_check_grid(g, "grid") for g in grids]
    dst = [_check_grid(t, "target") for t in targets]
    total = sum(h * w for h, w in src)
    if total != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but the grids hold {total} tokens")
    out: list[torch.Tensor] = []
    start = i = 0
    while i < len(src):
        j = i
        while j + 1 < len(src) and src[j + 1] == src[i] and dst[j + 1] == dst[i]:
            j += 1
        n, (H, W) = j - i + 1, src[i]
        chunk = x[start : start + n * H * W].reshape(n, H * W, -1)  # (n, H*W, C)
        pooled = pool_grid(chunk, src[i], dst[i], allow_upsample=allow_upsample)
        out.append(pooled.reshape(-1, x.shape[-1]))
        start += n * H * W
        i = j + 1
    return torch.cat(out, dim=0) if len(out) != 1 else out[0]
