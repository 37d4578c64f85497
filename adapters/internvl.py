"""InternVL (``InternVLForConditionalGeneration`` / ``InternVLModel``): N tokens per tile.

The InternVL processor cuts each image into 1..max_patches square tiles plus, when there
is more than one, a thumbnail of the whole image; the budget N applies to every tile
(crops and thumbnail alike), so an image of ``t`` tiles costs ``t * N`` tokens.

Stock data flow (transformers 5.23, ``InternVLModel.get_image_features``)::

    pixel_values (tiles, 3, S, S)          all tiles of all images of the batch, in order
      -> vision_tower                       (tiles, 1 + G*G, C)   CLS + G x G patch grid
      -> [:, 1:]  ("default" strategy)      (tiles, G*G, C)
      -> reshape + pixel_shuffle(0.5)       (tiles, G/2 * G/2, 4C)
      -> multi_modal_projector (LN-MLP)     (tiles, G*G/4, D)     D = LLM width

    (448 px tiles, patch 14: G = 32, 256 tokens per tile; the tiny test model: G = 8, 16.)

Patched::

    pixel_values (tiles, 3, S, S)
      -> vision_tower                       (tiles, 1 + G*G, C)
      -> [:, 1:]  ("default" strategy)      (tiles, G*G, C)
      -> TileGridProjector                  (tiles, h*w, D)
           drop CLS if still there ("full"), adaptive-avg-pool G x G -> h x w,
           LayerNorm(C) + SwiGLU(C -> D)

with ``(h, w) = flexproj.target_grid(N, (G, G))`` (``isqrt(N)`` per side on a square
grid, so ``h*w <= N``). The FlexProjector replaces pixel shuffle *and* MLP: it pools the
native ViT grid, so its input width is the ViT width ``C`` (not ``4C``), any N up to
``G*G`` (1024 at 448 px) works without upsampling, and N = 256 matches the stock count
at 448 px. A budget above ``G*G`` is a :class:`~flexproj.BudgetError`.

Why ``get_image_features`` is overridden (on the instance) rather than only the slot:
pixel shuffle is a method call inside ``get_image_features``, after a reshape that
assumes a square number of tokens. Neutralising the shuffle and swapping the projector
slot would do for ``"default"``, but under ``"full"`` the CLS is still there and the
reshape of ``1 + G*G`` tokens fails before the shuffle is reached (this is why the stock
model cannot run ``"full"``). So :func:`_flex_get_image_features` is upstream's method
minus reshape and shuffle. Upstream's decorators (``merge_with_config_defaults``: layer
and strategy default to the config, strategy validated; ``can_return_tuple``;
``select_hidden_states``) are done inline rather than imported, because
``select_hidden_states`` is recent and a failed import would take every adapter down
with older transformers 5.x. It is installed with ``functools.wraps`` of the original,
so ``inspect.signature`` (which ``generate()`` uses to choose its kwargs) is the stock
one. The projector slot still gets a module, :class:`TileGridProjector`,
holding the FlexProjector, so the projector is a registered submodule (``.to()``,
``parameters()``, ``state_dict()``). The stock projector stays in the module tree inside
it, as ``.stock`` (it follows ``.to()``; ``flexproj.disabled`` runs it, and
:func:`flexproj.unpatch` puts it back in the slot).

CLS: InternViT always prepends one. ``"default"`` drops it as upstream does; under
``"full"`` it is kept by the strategy but it is not a grid cell, so TileGridProjector
drops it explicitly. Both strategies therefore give the same features once patched.

Processor: ``InternVLProcessor.replace_image_token`` writes ``image_seq_length`` context
tokens per tile inside ``<img>...</img>``; the patched one writes the pooled ``h*w`` per
tile (tile size from the processed ``pixel_values``, patch size recorded at install in
``state.model_facts``). ``replace_video_token`` (one tile per frame) and
``_get_num_multimodal_tokens`` (the count vLLM reads) follow the budget too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration, InternVLModel, InternVLProcessor

from flexproj._types import Model
from flexproj.errors import PatchError, UnsupportedModelError
from flexproj.family import FamilyAdapter, int_budget, note_image
from flexproj.patcher import Patcher, stock_method
from flexproj.pooling import Grid, pool_grid, target_grid
from flexproj.registry import register_adapter
from flexproj.state import STATE_ATTR, PatchState, state_of

__all__ = ["InternVLAdapter", "TileGridProjector"]


class TileGridProjector(nn.Module):
    """Stands in ``multi_modal_projector``: ``(tiles, [CLS +] H*W, C) -> (tiles, h*w, D)``.

    The ``(H, W)`` patch grid comes from the caller (the tiles' pixel size / patch size).
    The stock projector stays inside as ``stock``: called the stock way (one argument,
    pixel-shuffled features) or inside ``flexproj.disabled``, the slot runs it.
    """

    def __init__(self, projector: nn.Module | None, stock: nn.Module) -> None:
        super().__init__()
        self.projector = projector  # None with projector="stock"
        self.stock = stock

    def forward(self, features: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        state = state_of(self)
        if grid is None or state is None or not state.enabled or self.projector is None:
            return self.stock(features)
        H, W = grid
        L = features.shape[1]
        if L not in (H * W, H * W + 1):
            raise ValueError(
                f"the vision tower gave {L} tokens per tile, expected the {H}x{W} patch grid "
                f"({H * W}), optionally after one CLS token"
            )
        drop_cls = L == H * W + 1  # a leading CLS (kept by "full") is not a grid cell
        budgets = state.unit_budgets(features.shape[0], units_are_images=False)
        for n in set(budgets):
            state.adapter.check_budget(n, H * W)
        if len(set(budgets)) == 1:
            return self._project(state, features, budgets[0], grid, drop_cls)
        # per-image budgets: each tile alone; (1, sum n_i, D), in tile order
        tiles = [
            self._project(state, features[i : i + 1], n, grid, drop_cls)[0]
            for i, n in enumerate(budgets)
        ]
        return torch.cat(tiles)[None]

    def _project(
        self, state: PatchState, features: torch.Tensor, n: int, grid: Grid, drop_cls: bool
    ) -> torch.Tensor:
        """``(tiles, [1 +] H*W, C) -> (tiles, n, D)``: the FlexProjector, or at the stock
        count under the native-budget rule upstream's reshape, pixel shuffle and stock MLP."""
        ratio = state.model_facts["downsample_ratio"]
        H, W = grid
        if not state.runs_stock(n, int(H * ratio) * int(W * ratio)):
            assert self.projector is not None
            return self.projector(features, tokens=n, grid=grid, drop_cls=drop_cls)
        x = features[:, 1:] if drop_cls else features  # (tiles, H*W, C)
        x = x.reshape(x.shape[0], H, W, -1)
        x = InternVLModel.pixel_shuffle(cast(Any, None), x, scale_factor=ratio)
        return cast(torch.Tensor, self.stock(x.reshape(x.shape[0], -1, x.shape[-1])))


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    """InternVL configs give image_size / patch_size as an int or an (h, w) pair."""
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _unit_grid(patch_grid: Grid, mode: str, downsample_ratio: float) -> Grid:
    """The grid a budget pools per tile: the ViT patch grid (FlexProjector), or the stock
    projector's output grid after pixel shuffle (``projector="stock"``: 16x16 at 448 px)."""
    if mode == "flex":
        return patch_grid
    return int(patch_grid[0] * downsample_ratio), int(patch_grid[1] * downsample_ratio)


def _native_grid(config: Any) -> Grid:
    """Patch grid of one tile: ``image_size // patch_size`` per side (32x32 at 448/14)."""
    (height, width), (ph, pw) = _pair(config.image_size), _pair(config.patch_size)
    return height // ph, width // pw


def _flex_get_image_features(
    self: Model,  # the InternVLModel
    pixel_values: torch.Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    **kwargs: Any,
) -> Any:
    """Upstream ``InternVLModel.get_image_features`` without the reshape + pixel shuffle:
    the slot (a :class:`TileGridProjector`) pools the native patch grid.

    Upstream's decorators are done inline: config defaults for the layer and strategy,
    strategy validation, ``return_dict``, and hidden states requested only when a layer
    other than the last is read.
    """
    config = self.config
    layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(
            f"Unexpected select feature strategy: {strategy!r}. Please select from ['default', 'full']."
        )
    return_dict = kwargs.pop("return_dict", None)
    return_dict = config.return_dict if return_dict is None else return_dict
    if layer != -1:
        kwargs.setdefault("output_hidden_states", True)

    pixel_values = pixel_values.to(dtype=self.dtype)  # (tiles, 3, S_h, S_w)
    vision_outputs = self.vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
    if layer == -1:
        features = vision_outputs.last_hidden_state  # (tiles, 1 + H*W, C)
    else:
        features = vision_outputs.hidden_states[layer]
    if strategy == "default":
        features = features[:, 1:, :]  # (tiles, H*W, C): CLS dropped, as upstream
    ph, pw = _pair(config.vision_config.patch_size)
    grid = (pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw)
    # (tiles, [1 +] H*W, C) -> (tiles, h*w, D)
    vision_outputs.pooler_output = self.multi_modal_projector(features, grid)
    return vision_outputs if return_dict else vision_outputs.to_tuple()


class InternVLAdapter(FamilyAdapter):
    """InternVL (2.5 / 3 in transformers' native format): budget per tile."""

    model_types = ("internvl",)
    model_classes: ClassVar[tuple[type, ...]] = (InternVLForConditionalGeneration, InternVLModel)
    processor_classes: ClassVar[tuple[type, ...]] = (InternVLProcessor,)
    unit = "tile"
    expands_mixed_budgets = False  # mixed budgets: one (1, sum n_i, D) row (TileGridProjector)
    recipe = "internvl"
    tiny = "flexproj.adapters.internvl_tiny"

    def base(self, model: Model) -> InternVLModel:
        """The ``InternVLModel`` that owns the vision tower and projector."""
        base = model if isinstance(model, InternVLModel) else model.model
        if not isinstance(base, InternVLModel):
            raise UnsupportedModelError(f"{type(model).__name__} has no InternVLModel at .model")
        return base

    def projector_slot(self, model: Model) -> tuple[nn.Module, str]:
        return self.base(model), "multi_modal_projector"

    def projector_dims(self, model: Model) -> tuple[int, int]:
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise PatchError(
                "InternVL reads one vision layer; vision_feature_layer="
                f"{config.vision_feature_layer!r} is not supported (upstream does not either)"
            )
        # the pixel shuffle is bypassed: the projector sees the ViT width C, not 4C
        return int(config.vision_config.hidden_size), int(config.text_config.hidden_size)

    def native_tokens(self, model: Model, mode: str = "flex") -> int:
        ratio = float(model.config.downsample_ratio)
        rows, cols = _unit_grid(_native_grid(model.config.vision_config), mode, ratio)
        return rows * cols

    def install(self, model: Model, state: PatchState) -> None:
        self.projector_dims(model)  # validates vision_feature_layer
        base = self.base(model)
        state.model_facts["patch_size"] = _pair(model.config.vision_config.patch_size)
        state.model_facts["downsample_ratio"] = float(model.config.downsample_ratio)
        stock = base.multi_modal_projector
        self.freeze_stock(stock, state)
        slot = TileGridProjector(state.projector if state.mode == "flex" else None, stock)
        setattr(slot, STATE_ATTR, state)
        state.model_patcher.set(base, "multi_modal_projector", slot)
        state.model_patcher.override_method(base, "get_image_features", _get_image_features)

    # --- processor ---------------------------------------------------------
    def tile_tokens(self, state: PatchState, budget: int, tile_hw: Sequence[int]) -> int:
        """Context tokens per tile of ``tile_hw`` pixels under ``budget``."""
        ph, pw = state.model_facts["patch_size"]
        patches = (int(tile_hw[0]) // ph, int(tile_hw[1]) // pw)
        grid = _unit_grid(patches, state.mode, state.model_facts["downsample_ratio"])
        h, w = target_grid(self.check_budget(budget, grid[0] * grid[1]), grid)
        return h * w

    def patch_processor(self, processor: Any, state: PatchState, patcher: Patcher) -> None:
        self.check_processor(processor)
        patcher.override_method(processor, "replace_image_token", _replace_image_token)
        patcher.override_method(processor, "replace_video_token", _replace_video_token)


def _adapter(state: PatchState) -> InternVLAdapter:
    return cast(InternVLAdapter, state.adapter)


def _get_image_features(self: Model, *args: Any, **kwargs: Any) -> Any:
    """Patched ``InternVLModel.get_image_features`` (stock inside ``flexproj.disabled``)."""
    state = state_of(self)
    if state is None or not state.enabled:
        return stock_method(self, "get_image_features")(*args, **kwargs)
    if state.mode == "stock":
        return _pooled_stock_image_features(self, state, args, kwargs)
    return _flex_get_image_features(self, *args, **kwargs)


def _pooled_stock_image_features(self: Model, state: PatchState, args: tuple, kwargs: dict) -> Any:
    """projector="stock": upstream's features (pixel shuffle + stock MLP), each tile's
    output grid average-pooled to the budget."""
    return_dict = kwargs.pop("return_dict", None)
    return_dict = self.config.return_dict if return_dict is None else return_dict
    output = stock_method(self, "get_image_features")(*args, return_dict=True, **kwargs)
    features = output.pooler_output  # (tiles, S*S, D), S = the shuffled grid side
    grid = (math.isqrt(features.shape[1]),) * 2
    budgets = state.unit_budgets(features.shape[0], units_are_images=False)
    for n in set(budgets):
        state.adapter.check_budget(n, grid[0] * grid[1])
    if len(set(budgets)) == 1:
        output.pooler_output = pool_grid(features, grid, target_grid(budgets[0], grid))
    else:  # per-image budgets: (1, sum n_i, D), in tile order
        tiles = [
            pool_grid(features[i : i + 1], grid, target_grid(n, grid))[0]
            for i, n in enumerate(budgets)
        ]
        output.pooler_output = torch.cat(tiles)[None]
    return output if return_dict else output.to_tuple()


def _replace_image_token(self: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
    state = state_of(self)
    if state is None or not state.enabled:
        return stock_method(self, "replace_image_token")(image_inputs, image_idx, **kwargs)
    tiles = int(image_inputs["num_patches"][image_idx])
    budget = state.image_budgets(len(image_inputs["num_patches"]))[image_idx]
    tile_hw = image_inputs["pixel_values"][0].shape[-2:]  # every tile has the same size
    count = _adapter(state).tile_tokens(state, budget, tile_hw) * tiles
    note_image(image_idx, units=tiles, tokens=count)
    context = self.image_token * count
    return f"{self.start_image_token}{context}{self.end_image_token}"


def _replace_video_token(self: Any, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
    state = state_of(self)
    if state is None or not state.enabled:
        return stock_method(self, "replace_video_token")(video_inputs, video_idx, **kwargs)
    frames = video_inputs["pixel_values_videos"][video_idx]  # (frames, 3, S, S)
    budget = int_budget(state, "videos")
    context = self.image_token * _adapter(state).tile_tokens(state, budget, frames.shape[-2:])
    return "\n".join(
        f"Frame{i + 1}: {self.start_image_token}{context}{self.end_image_token}"
        for i in range(frames.shape[0])
    )


register_adapter(InternVLAdapter())
