"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Budget unit: one image, or one temporal patch of a video. Every image keeps its own grid:
one whose merged grid (``grid_thw[1:] // m``, m = spatial merge size, 2) is ``h x w``
gets ``(h', w') = flexproj.target_grid(N, (h, w))`` tokens per temporal patch: aspect
ratio kept, at most ``N``, and never more than its native ``h * w`` (``caps_budget``: a
budget above an image's count leaves that image as it is; small images are never
upsampled).

Data flow of a patched model (C = vision width, D = LLM width, grids in patches)::

    pixel_values (sum t*H*W, 3*tp*p*p), grid_thw (n, 3) rows (t, H, W)
      visual blocks, on the REAL grid_thw (patch RoPE, cu_seqlens, Qwen2.5-VL windows)
                                                   -> (sum t*H*W, C), block-major
                                                      [t, H/m, W/m, m, m] per image
      visual.merger = MergerPassThrough: no math, one row per merged unit
                                                   -> (sum t*H*W/m², m²*C)
        (Qwen2.5-VL permuted the units into windows before the blocks; it applies its
        ``reverse_indices`` to the merger output, which stays valid because the slot
        keeps one row per unit: the order is restored before anything is pooled)
      stock get_image_features splits per image    -> [(t*H/m*W/m, m²*C), ...]
      wrapped get_image_features, per image and temporal patch:
        units -> row-major patch grid              -> (t, H, W, C)
        adaptive avg pool (H, W) -> (h', w')       -> (t*h'*w', C)
        FlexProjector.project (LayerNorm, SwiGLU)  -> (t*h'*w', D)
        Qwen3-VL deepstack: each stock deepstack merger's output (t*H/m*W/m, D) is pooled
        (H/m, W/m) -> (h', w') the same way
      split by the new per-image counts t*h'*w'

    LLM side: get_rope_index is handed the pooled grid (t, h'*m, w'*m), so M-RoPE lays
    out exactly the t*h'*w' tokens the processor emitted and rope_deltas follow.

Design decisions:

* **Pool the patch grid, project C -> D** (FlexProjector ``in_dim`` = vision width). This
  is TokenFLEX as published (average the encoder's patch grid, then the SwiGLU maps the
  encoder width to the LLM width), matches the other families, keeps the projector small
  (the reference's ``3 * in_dim`` hidden width on C, not on m²*C = 4C), and pools at patch
  resolution, so bins follow the image rather than the 2x2 merge blocks. At a budget equal
  to an image's native merged count the pooled grid *is* the native merged grid (each
  token the mean of its m x m patches), so placeholder counts and M-RoPE positions equal
  the stock model's. The alternative, pooling merged units of width m²*C, is exactly the
  identity at the native count and keeps the 2x2 detail there, but quadruples the
  projector's input width and averages the four in-block positions as separate channels.
* **Pool after the order is restored.** The merger slot is a pass-through that keeps one
  row per merged unit: a module returning fewer rows makes Qwen2.5-VL's
  ``reverse_indices`` raise, and one returning the un-merged ``(sum t*H*W, C)`` rows raises
  nothing but lets ``reverse_indices`` (one index per unit) pick the wrong rows. Pooling
  and projection happen in ``get_image_features`` / ``get_video_features``, where the
  stock code has already un-permuted and split the features and the grids are known.
  ``visual(...)`` called directly therefore returns unprojected tower features.
* **Qwen3-VL deepstack: pool the outputs.** The deepstack mergers stay stock (pretrained,
  untouched) and their outputs are *added* to the LLM hidden states at the vision
  positions, so averaging those additions over each pooled cell is the counterpart of
  averaging the features, needs no new weights, and is the exact identity at the native
  count. Their bins are computed on the merged grid (H/m, W/m), so they cover the same
  cell as the main path's patch-grid bins up to merged-unit rounding when h' does not
  divide H/m.
* **Videos** are supported: the same budget per temporal patch, temporal positions
  unchanged (Qwen2.5-VL's ``second_per_grid_ts`` spacing and Qwen3-VL's per-frame
  timestamps included, since the stock code runs on the pooled grid).
* **Mismatches** between placeholders and features raise
  :class:`~flexproj.TokenCountMismatch` naming both counts, from ``get_rope_index``
  (``generate()`` computes positions before it encodes images) and from
  ``get_placeholder_mask`` (``forward``), for images and videos.

Every method override keeps the wrapped method's signature (``functools.wraps``):
``generate()`` picks ``get_image_features`` kwargs by ``inspect.signature``.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import numpy as np
import torch
from einops import rearrange
from torch import nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen2VLProcessor,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLProcessor,
)

from flexproj.carried import BUDGETS_KEY, budget_scope
from flexproj.family import FamilyAdapter, check_count, int_budget, note_image
from flexproj.patcher import Patcher, stock_method
from flexproj.pooling import Grid, pool_packed, target_grid
from flexproj.registry import register_adapter
from flexproj.state import STATE_ATTR, PatchState, disabled_state, state_of

__all__ = [
    "MergerPassThrough",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "llm_grid",
    "pooled_grid_thw",
]

# Set while a wrapped get_*_features runs: Qwen3-VL's get_video_features calls
# self.get_image_features, which must then pass through instead of pooling twice.
_ENCODING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "flexproj_qwen_encoding", default=False
)

# (modality, grid_thw argument of get_rope_index, config attribute of its token id)
_MODALITIES = (
    ("image", "image_grid_thw", "image_token_id"),
    ("video", "video_grid_thw", "video_token_id"),
)


# ----------------------------------------------------------------------------- grids


def llm_grid(grid_thw: Sequence[int], tokens: int, merge: int) -> tuple[int, int, int]:
    """``(t, h', w')`` LLM tokens of one image / video of ``grid_thw = (t, H, W)`` patches.

    ``(h', w') = target_grid(tokens, (H // merge, W // merge))``: at most ``tokens`` per
    temporal patch, aspect ratio kept, never above the native merged grid.
    """
    t, H, W = (int(v) for v in grid_thw)
    h, w = target_grid(tokens, (H // merge, W // merge))
    return t, h, w


def pooled_grid_thw(
    grid_thw: torch.Tensor, tokens: int | Sequence[int], merge: int
) -> torch.Tensor:
    """The grid the LLM side sees, in patch units: rows ``(t, h'*m, w'*m)``, same dtype/device.

    ``tokens``: one budget for every row, or one per row."""
    grids = grid_thw.tolist()
    budgets = [tokens] * len(grids) if isinstance(tokens, int) else list(tokens)
    rows = [llm_grid(row, n, merge) for row, n in zip(grids, budgets, strict=True)]
    pooled = [[t, h * merge, w * merge] for t, h, w in rows]
    return torch.tensor(pooled, dtype=grid_thw.dtype, device=grid_thw.device).reshape(-1, 3)


def _units_to_patch_rows(
    units: torch.Tensor, grids: Sequence[tuple[int, int, int]], merge: int
) -> torch.Tensor:
    """Merged units back to row-major patches: ``(sum t*H*W/m², m²*C) -> (sum t*H*W, C)``.

    Units come in row-major order over each image's merged grid ``(t, H/m, W/m)``; a unit's
    ``m²*C`` values are its ``m x m`` patches, row-major, each ``C`` wide (the block-major
    layout of Qwen's image processor and vision tower).
    """
    C = units.shape[-1] // (merge * merge)
    out, start = [], 0
    for t, H, W in grids:
        n = t * (H // merge) * (W // merge)
        pattern = "(t h w) (mh mw c) -> (t h mh w mw) c"  # rows, then columns, of patches
        rows = rearrange(units[start : start + n], pattern, t=t, h=H // merge, mh=merge, c=C)
        out.append(rows)
        start += n
    if start != units.shape[0]:
        raise ValueError(
            f"the vision tower gave {units.shape[0]} merged units, the grids hold {start}"
        )
    return torch.cat(out) if len(out) != 1 else out[0]


def _config(model: nn.Module) -> Any:
    return model.config


def _cat(features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return features if isinstance(features, torch.Tensor) else torch.cat(list(features))


# ----------------------------------------------------------------------------- merger slot


class MergerPassThrough(nn.Module):
    """Stands in ``visual.merger``: ``(sum t*H*W, C) -> (sum t*H*W/m², m²*C)``, a view.

    It keeps one row per merged unit, as the stock merger does, so Qwen2.5-VL's
    ``reverse_indices`` still restore the unit order after window attention. It owns the
    FlexProjector (so the projector is in ``model.parameters()``, moves with ``.to()`` and
    sits in the state dict under ``visual.merger.projector``), but pooling and projection
    run later, in the wrapped ``get_image_features``, once the per-image grids are known.
    """

    def __init__(self, projector: nn.Module | None, stock: nn.Module, merge_size: int) -> None:
        super().__init__()
        self.projector = projector  # None with projector="stock"
        self.stock = stock  # the stock merger (follows .to(); runs inside flexproj.disabled)
        self.merge_size = merge_size

    def extra_repr(self) -> str:
        return f"merge_size={self.merge_size} (pass-through; projects in get_image_features)"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        state = state_of(self)
        if state is None or not state.enabled or self.projector is None:
            return self.stock(hidden_states)
        unit = self.merge_size**2
        return hidden_states.reshape(-1, unit * hidden_states.shape[-1])  # (L/m², m²*C)


# ----------------------------------------------------------------------------- adapters


class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration`` / ``Qwen2VLModel``)."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    model_classes: ClassVar[tuple[type, ...]] = (Qwen2VLForConditionalGeneration, Qwen2VLModel)
    processor_classes: ClassVar[tuple[type, ...]] = (Qwen2VLProcessor,)
    base_class: ClassVar[type] = Qwen2VLModel
    unit = "image or temporal patch"
    caps_budget = True
    recipe = "qwen_vl"
    tiny = "flexproj.adapters.qwen_vl_tiny"

    # --- model side -------------------------------------------------------
    def base(self, model: nn.Module) -> Any:
        """The ``*Model`` that owns ``visual`` and ``get_image_features``."""
        return model if isinstance(model, self.base_class) else model.model

    def merge_size(self, model: nn.Module) -> int:
        return int(_config(model).vision_config.spatial_merge_size)

    def vision_width(self, model: nn.Module) -> int:
        """``C``: the tower's width (Qwen2-VL's ``vision_config.hidden_size`` is the merger's output)."""
        return int(_config(model).vision_config.embed_dim)

    def projector_slot(self, model: nn.Module) -> tuple[nn.Module, str]:
        return self.base(model).visual, "merger"

    def vision_tower(self, model: nn.Module) -> nn.Module:
        tower: nn.Module = self.base(model).visual
        return tower

    def projector_dims(self, model: nn.Module) -> tuple[int, int]:
        return self.vision_width(model), int(_config(model).text_config.hidden_size)

    def native_tokens(self, model: nn.Module, mode: str = "flex") -> int | None:
        """None: Qwen has no fixed count, each image keeps its own native grid (budgets
        are capped per image)."""
        return None

    def install(self, model: nn.Module, state: PatchState) -> None:
        base = self.base(model)
        patcher = state.model_patcher
        stock = base.visual.merger
        self.freeze_stock(stock, state)
        projector = state.projector if state.mode == "flex" else None
        slot = MergerPassThrough(projector, stock, self.merge_size(model))
        setattr(slot, STATE_ATTR, state)
        patcher.set(base.visual, "merger", slot)
        patcher.override_method(base, "get_image_features", _get_image_features)
        patcher.override_method(base, "get_video_features", _get_video_features)
        patcher.override_method(base, "get_rope_index", _get_rope_index)

    def pool_output(
        self, output: Any, grid_thw: Any, budgets: Sequence[int], projector: Any, merge: int
    ) -> None:
        """Pool and project the stock features of ``output`` in place (see the module
        docstring); ``projector=None`` (``projector="stock"``): the stock merger's outputs
        are pooled on the merged grid, as the deepstack outputs are."""
        if not isinstance(grid_thw, torch.Tensor):
            raise ValueError(
                "Qwen-VL vision features need their grid_thw (image_grid_thw / video_grid_thw)"
            )
        grids = [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]
        llm = [llm_grid(g, n, merge) for g, n in zip(grids, budgets, strict=True)]
        counts = [t * h * w for t, h, w in llm]
        targets: list[Grid] = [(h, w) for t, h, w in llm for _ in range(t)]

        merged: list[Grid] = [(H // merge, W // merge) for t, H, W in grids for _ in range(t)]
        units = _cat(output.pooler_output)  # flex: (sum t*H*W/m², m²*C); stock: (.., D)
        if projector is None:  # stock merger outputs, merged units row-major
            pooled = pool_packed(units, merged, targets)  # (sum t*h'*w', D)
            output.pooler_output = torch.split(pooled, counts)
        else:
            patches = _units_to_patch_rows(units, grids, merge)  # (sum t*H*W, C)
            frames: list[Grid] = [(H, W) for t, H, W in grids for _ in range(t)]
            pooled = pool_packed(patches, frames, targets)  # (sum t*h'*w', C)
            output.pooler_output = torch.split(projector.project(pooled), counts)

        deepstack = getattr(output, "deepstack_features", None)
        if deepstack:  # Qwen3-VL: [layer][image] (t*H/m*W/m, D), merged units row-major
            output.deepstack_features = [
                torch.split(pool_packed(_cat(layer), merged, targets), counts)
                for layer in deepstack
            ]

    # --- processor -----------------------------------------------------------
    def patch_processor(self, processor: Any, state: PatchState, patcher: Patcher) -> None:
        """Emit ``t * h' * w'`` placeholders per image / video.

        The stock ``replace_*_token`` is called with the pooled grid ``(t, h'*m, w'*m)`` in
        place of the real one, so everything else it does (Qwen3-VL's per-frame timestamps
        and vision start/end tokens) stays upstream's; ``mm_token_type_ids`` is derived from
        the expanded ids afterwards, so it follows.
        """
        self.check_processor(processor)
        patcher.override_method(processor, "replace_image_token", _replace_image_token)
        patcher.override_method(processor, "replace_video_token", _replace_video_token)


def _pooled_features(self: Any, name: str, grid_key: str, args: tuple, kwargs: dict) -> Any:
    """Patched ``get_image_features`` / ``get_video_features``: stock tower, then pool + project."""
    stock = stock_method(self, name)
    state = state_of(self)
    slot = self.visual.merger
    if state is None or not state.enabled or _encoding(slot):
        # stock path, or called from inside another wrapped get_*_features (Qwen3-VL's
        # get_video_features calls get_image_features): pass through, pool once
        return stock(*args, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:  # as transformers' can_return_tuple decides
        return_dict = getattr(self.config, "return_dict", True)
    grid_thw = inspect.signature(stock).bind(*args, **kwargs).arguments.get(grid_key)
    merge = int(self.config.vision_config.spatial_merge_size)
    budgets = _row_budgets(state, grid_key, grid_thw)
    native = _runs_stock(state, grid_thw, budgets, merge)
    if native and all(native):  # the native-budget rule, every image: the stock call
        with disabled_state(state):
            return stock(*args, return_dict=return_dict, **kwargs)
    if torch.compiler.is_compiling():  # a plain attribute: Dynamo cannot read a ContextVar
        slot.traced_encoding = True
        output = stock(*args, return_dict=True, **kwargs)
        slot.traced_encoding = False
    else:
        token = _ENCODING.set(True)
        try:
            output = stock(*args, return_dict=True, **kwargs)
        finally:
            _ENCODING.reset(token)
    adapter = cast(Qwen2VLAdapter, state.adapter)
    projector = state.projector if state.mode == "flex" else None
    units = _cat(output.pooler_output)  # flex: (sum t*H*W/m², m²*C), unit order restored
    adapter.pool_output(output, grid_thw, budgets, projector, merge)
    if any(native):  # per-image budgets: the images at their stock count get the stock merger
        assert isinstance(grid_thw, torch.Tensor)
        sizes = [t * (h // merge) * (w // merge) for t, h, w in grid_thw.tolist()]
        merger = getattr(*adapter.projector_slot(self)).stock
        output.pooler_output = tuple(
            merger(u.reshape(-1, u.shape[-1] // merge**2)) if stock else pooled
            for u, pooled, stock in zip(
                torch.split(units, sizes), output.pooler_output, native, strict=True
            )
        )
    return output if return_dict else output.to_tuple()


def _encoding(slot: Any) -> bool:
    """Whether a wrapped ``get_*_features`` is running: the ContextVar, or while traced the
    slot's flag (a compiled graph runs in one thread at a time)."""
    if torch.compiler.is_compiling():
        return bool(getattr(slot, "traced_encoding", False))
    return _ENCODING.get()


def _runs_stock(state: PatchState, grid_thw: Any, budgets: Sequence[int], merge: int) -> list[bool]:
    """Per image / video: does the native-budget rule give it the stock merger? (budgets
    are capped at each image's merged count per temporal patch)"""
    if not isinstance(grid_thw, torch.Tensor):
        return []
    counts = [(h // merge) * (w // merge) for _, h, w in grid_thw.tolist()]
    return [state.runs_stock(min(n, c), c) for n, c in zip(budgets, counts, strict=True)]


def _get_image_features(self: Any, *args: Any, **kwargs: Any) -> Any:
    return _pooled_features(self, "get_image_features", "image_grid_thw", args, kwargs)


def _get_video_features(self: Any, *args: Any, **kwargs: Any) -> Any:
    return _pooled_features(self, "get_video_features", "video_grid_thw", args, kwargs)


def _get_rope_index(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Patched ``get_rope_index``: M-RoPE laid out on the pooled grids.

    ``generate()`` computes positions before it encodes images, so placeholder counts are
    checked here too (the one check of :mod:`flexproj.family`).
    """
    stock = stock_method(self, "get_rope_index")
    value = kwargs.pop(BUDGETS_KEY, None)  # generate hands it its model kwargs
    state = state_of(self)
    if state is None or not state.enabled:
        return stock(*args, **kwargs)
    with budget_scope(state, value):
        return _pooled_rope_index(self, state, stock, args, kwargs)


def _pooled_rope_index(self: Any, state: PatchState, stock: Any, args: tuple, kwargs: dict) -> Any:
    bound = inspect.signature(stock).bind(*args, **kwargs)
    input_ids = bound.arguments.get("input_ids")
    merge = int(self.config.vision_config.spatial_merge_size)
    for kind, grid_key, id_name in _MODALITIES:
        grid_thw = bound.arguments.get(grid_key)
        if grid_thw is None:
            continue
        budgets = _row_budgets(state, grid_key, grid_thw)
        pooled = pooled_grid_thw(grid_thw, budgets, merge)  # (n, 3): (t, h'*m, w'*m)
        if input_ids is not None:
            produced = int((pooled.prod(-1) // merge**2).sum())
            placeholders = int((input_ids == getattr(self.config, id_name)).sum())
            check_count(state, kind, placeholders, produced)
        bound.arguments[grid_key] = pooled
    return stock(*bound.args, **bound.kwargs)


def _replace_with_pooled_grid(
    self: Any, name: str, grid_key: str, merge: int, inputs: dict, idx: int, kwargs: dict
) -> str:
    """Call the stock ``replace_*_token`` with the pooled grid in place of the real one."""
    stock = stock_method(self, name)
    state = state_of(self)
    if state is not None and state.enabled:
        grid_thw = torch.as_tensor(np.asarray(inputs[grid_key]), dtype=torch.long)  # (n, 3)
        budgets = _row_budgets(state, grid_key, grid_thw)
        pooled = pooled_grid_thw(grid_thw, budgets, merge)  # (n, 3): (t, h'*m, w'*m)
        if grid_key == "image_grid_thw":  # one projector row per image
            note_image(idx, units=1, tokens=int(pooled[idx].prod()) // merge**2)
        inputs = {**inputs, grid_key: pooled.numpy()}
    return stock(inputs, idx, **kwargs)


def _row_budgets(state: PatchState, grid_key: str, grid_thw: Any) -> list[int]:
    """One budget per image (a per-image list applies), or per video (one int only)."""
    rows = len(grid_thw)
    if grid_key == "video_grid_thw":
        return [int_budget(state, "videos")] * rows
    return state.image_budgets(rows)


def _replace_image_token(self: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
    merge = int(self.image_processor.merge_size)
    return _replace_with_pooled_grid(
        self, "replace_image_token", "image_grid_thw", merge, image_inputs, image_idx, kwargs
    )


def _replace_video_token(self: Any, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
    merge = int(self.video_processor.merge_size)
    return _replace_with_pooled_grid(
        self, "replace_video_token", "video_grid_thw", merge, video_inputs, video_idx, kwargs
    )


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: window attention in the tower (restored by the stock code before pooling)."""

    model_types = ("qwen2_5_vl",)
    model_classes: ClassVar[tuple[type, ...]] = (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLModel,
    )
    processor_classes: ClassVar[tuple[type, ...]] = (Qwen2_5_VLProcessor,)
    base_class: ClassVar[type] = Qwen2_5_VLModel

    def vision_width(self, model: nn.Module) -> int:
        return int(_config(model).vision_config.hidden_size)


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Qwen3-VL: deepstack features pooled to the same grids; per-frame video timestamps."""

    model_types = ("qwen3_vl",)
    model_classes: ClassVar[tuple[type, ...]] = (Qwen3VLForConditionalGeneration, Qwen3VLModel)
    processor_classes: ClassVar[tuple[type, ...]] = (Qwen3VLProcessor,)
    base_class: ClassVar[type] = Qwen3VLModel


register_adapter(Qwen2VLAdapter())
register_adapter(Qwen2_5_VLAdapter())
register_adapter(Qwen3VLAdapter())
