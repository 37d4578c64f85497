"""Run the vision tower once per image, however many budgets it is pooled to.

Inside ``with vision_cache(model):``, in this thread or task only, the model's vision
tower keeps its outputs per image
(LLaVA-family and InternVL towers: one row of ``pixel_values`` per image, crop or tile;
Qwen-VL: the ``t*H*W`` patch rows of each image, from ``grid_thw``), keyed by the pixel
content. A later call whose images were all seen is answered from the cache, rows
re-assembled in the new order; a call with any unseen image runs the tower on the whole
call and stores it. Pooling and projection run after the tower, so each budget still
gets its own features: this is what lets :func:`flexproj.adaptive_generate` re-answer at
a larger budget without encoding the images again.

The cache is context-local: :func:`flexproj.patch` overrides the tower's ``forward`` once
(undone by ``unpatch``), and that override consults the caches the current context opened
(a :class:`contextvars.ContextVar`); outside any block, in another thread, or while
torch.compile traces, it is the stock forward. So blocks on one model from several
threads never touch each other's caches, and leave nothing behind on the tower.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flexproj._types import Model
from flexproj.errors import PatchError
from flexproj.patcher import stock_method
from flexproj.state import state_of

__all__ = ["EncoderCache", "cached_tower_forward", "vision_cache"]

#: id(tower) -> the cache of the innermost vision_cache block open on it in this context
_OPEN: contextvars.ContextVar[dict[int, EncoderCache] | None] = contextvars.ContextVar(
    "flexproj_encoder_caches", default=None
)


@dataclass
class EncoderCache:
    """Per-image tower outputs of one ``vision_cache`` block, and what it cost."""

    entries: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    #: images (crops, tiles) the tower computed / answered from the cache
    computed: int = 0
    reused: int = 0


def _split(value: Any, sizes: Sequence[int], total: int) -> list[Any] | None:
    """``value`` cut into per-chunk pieces along dim 0 (rows proportional to ``sizes``)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        rows = value.shape[0]
        if rows == total:
            return list(torch.split(value, list(sizes)))
        if rows and total % rows == 0 and all(s % (total // rows) == 0 for s in sizes):
            ratio = total // rows  # e.g. Qwen's merged units: one row per m*m patches
            return list(torch.split(value, [s // ratio for s in sizes]))
        return None
    if isinstance(value, (list, tuple)) and value:
        # (hidden states captured for selected layers only hold None elsewhere)
        parts = [[None] * len(sizes) if v is None else _split(v, sizes, total) for v in value]
        if any(p is None for p in parts):
            return None
        return [type(value)(p[i] for p in parts) for i in range(len(sizes))]  # type: ignore[index]
    return None


def _join(pieces: Sequence[Any]) -> Any:
    first = pieces[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(list(pieces))
    return type(first)(_join([p[i] for p in pieces]) for i in range(len(first)))


def _chunks(pixel_values: torch.Tensor, kwargs: dict[str, Any]) -> list[int]:
    grid_thw = kwargs.get("grid_thw")
    if isinstance(grid_thw, torch.Tensor):  # Qwen-VL: packed patch rows per image
        return [int(n) for n in grid_thw.prod(-1).tolist()]
    return [1] * pixel_values.shape[0]


def _key(pixels: torch.Tensor, extra: str) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(pixels.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(f"{tuple(pixels.shape)}|{pixels.dtype}|{extra}".encode())
    return digest.digest()


def cached_tower_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The tower's ``forward`` while patched: answered from this context's open cache."""
    stock = stock_method(self, "forward")
    if torch.compiler.is_compiling():  # first: a compiled graph reads no ContextVar
        return stock(*args, **kwargs)
    cache = (_OPEN.get() or {}).get(id(self))
    pixel_values = args[0] if args else kwargs.get("pixel_values")
    if cache is None or not isinstance(pixel_values, torch.Tensor):
        return stock(*args, **kwargs)
    sizes = _chunks(pixel_values, kwargs)
    extra = repr(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))
    grid = kwargs.get("grid_thw")
    rows = torch.split(pixel_values, sizes)
    keys = [
        _key(r, extra + (repr(grid[i].tolist()) if isinstance(grid, torch.Tensor) else ""))
        for i, r in enumerate(rows)
    ]
    if all(k in cache.entries for k in keys):
        cache.reused += len(keys)
        first = cache.entries[keys[0]]
        out = first["type"](**{name: _join([cache.entries[k]["fields"][name] for k in keys])
                              for name in first["fields"]})  # fmt: skip
        for name, value in first["constant"].items():
            out[name] = value
        return out
    out = stock(*args, **kwargs)
    cache.computed += len(keys)
    if not hasattr(out, "items"):  # a plain tuple: nothing to key fields by
        return out
    total = sum(sizes)
    fields, constant = {}, {}
    for name, value in out.items():
        pieces = _split(value, sizes, total)
        if pieces is None:
            constant[name] = value
        else:
            fields[name] = pieces
    for i, k in enumerate(keys):
        cache.entries[k] = {
            "type": type(out),
            "fields": {name: pieces[i] for name, pieces in fields.items()},
            "constant": constant,
        }
    return out


@contextlib.contextmanager
def vision_cache(model: Model) -> Iterator[EncoderCache]:
    """Cache patched ``model``'s vision tower per image inside the block, in this context
    only (see the module docstring)."""
    state = state_of(model)
    if state is None:
        raise PatchError("vision_cache needs a model patched by flexproj.patch(model)")
    tower = state.adapter.vision_tower(model)
    cache = EncoderCache()
    reset = _OPEN.set({**(_OPEN.get() or {}), id(tower): cache})
    try:
        yield cache
    finally:
        _OPEN.reset(reset)
