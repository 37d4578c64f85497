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
``parameters()``, ``state_dict()``) and the stock projector leaves the module tree
until :func:`flexproj.unpatch` puts it back.

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

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration, InternVLModel, InternVLProcessor
from transformers.processing_utils import MultiModalData

from flexproj._types import Model
from flexproj.adapters.base import FamilyAdapter, Patcher, PatchState, register_adapter
from flexproj.errors import PatchError, UnsupportedModelError
from flexproj.pooling import Grid, target_grid
from flexproj.projector import FlexProjector

__all__ = ["InternVLAdapter", "TileGridProjector"]


class TileGridProjector(nn.Module):
    """Stands in ``multi_modal_projector``: ``(tiles, [CLS +] H*W, C) -> (tiles, h*w, D)``.

    ``budget(native)`` returns the validated budget for a tile of ``native`` patches;
    the ``(H, W)`` patch grid comes from the caller (the tiles' pixel size / patch size).
    """

    def __init__(self, projector: FlexProjector, budget: Callable[[int], int]) -> None:
        super().__init__()
        self.projector = projector
        self._budget = budget

    def forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        H, W = grid
        L = features.shape[1]
        if L not in (H * W, H * W + 1):
            raise ValueError(
                f"the vision tower gave {L} tokens per tile, expected the {H}x{W} patch grid "
                f"({H * W}), optionally after one CLS token"
            )
        n = self._budget(H * W)
        # a leading CLS (kept by the "full" strategy) is not a grid cell: drop it
        return self.projector(features, tokens=n, grid=grid, drop_cls=L == H * W + 1)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    """InternVL configs give image_size / patch_size as an int or an (h, w) pair."""
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


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

    def native_tokens(self, model: Model) -> int:
        rows, cols = _native_grid(model.config.vision_config)
        return rows * cols

    def install(self, model: Model, state: PatchState) -> None:
        self.projector_dims(model)  # validates vision_feature_layer
        base = self.base(model)
        state.model_facts["patch_size"] = _pair(model.config.vision_config.patch_size)
        slot = TileGridProjector(
            state.projector, budget=lambda native: self.check_budget(state.tokens(), native)
        )
        state.model_patcher.set(base, "multi_modal_projector", slot)

        # wraps(): the stock name, docstring and signature (generate() picks kwargs by it)
        @functools.wraps(type(base).get_image_features)
        def get_image_features(self: Model, *args: Any, **kwargs: Any) -> Any:
            return _flex_get_image_features(self, *args, **kwargs)

        state.model_patcher.override_method(base, "get_image_features", get_image_features)
        self.guard_placeholder_count(base, state, model.config.image_token_id)

    # --- processor ---------------------------------------------------------
    def tile_tokens(self, state: PatchState, tile_hw: Sequence[int]) -> int:
        """Context tokens per tile of ``tile_hw`` pixels under the budget in force."""
        ph, pw = state.model_facts["patch_size"]
        grid = (int(tile_hw[0]) // ph, int(tile_hw[1]) // pw)
        h, w = target_grid(self.check_budget(state.tokens(), grid[0] * grid[1]), grid)
        return h * w

    def patch_processor(self, processor: Any, state: PatchState, patcher: Patcher) -> None:
        self.check_processor(processor)
        adapter = self
        original_counts = processor._get_num_multimodal_tokens

        def replace_image_token(
            self: Any, image_inputs: dict, image_idx: int, **kwargs: Any
        ) -> str:
            tiles = int(image_inputs["num_patches"][image_idx])
            tile_hw = image_inputs["pixel_values"][0].shape[-2:]  # every tile has the same size
            context = self.image_token * (adapter.tile_tokens(state, tile_hw) * tiles)
            return f"{self.start_image_token}{context}{self.end_image_token}"

        def replace_video_token(
            self: Any, video_inputs: dict, video_idx: int, **kwargs: Any
        ) -> str:
            frames = video_inputs["pixel_values_videos"][video_idx]  # (frames, 3, S, S)
            context = self.image_token * adapter.tile_tokens(state, frames.shape[-2:])
            return "\n".join(
                f"Frame{i + 1}: {self.start_image_token}{context}{self.end_image_token}"
                for i in range(frames.shape[0])
            )

        def _get_num_multimodal_tokens(self: Any, image_sizes: Any = None, **kwargs: Any) -> Any:
            data = original_counts(image_sizes=image_sizes, **kwargs)
            if data.num_image_patches is None:
                return data
            # the kwargs class is passed explicitly: transformers 5.19 requires it (5.23 defaults it)
            merged = self._merge_kwargs(self.valid_processor_kwargs, **kwargs)
            size = merged["images_kwargs"].get("size") or (
                self.image_processor.size  # tile size: a call's size=... wins
            )
            per_tile = adapter.tile_tokens(state, (size["height"], size["width"]))
            return MultiModalData(
                num_image_tokens=[2 + per_tile * tiles for tiles in data.num_image_patches],
                num_image_patches=data.num_image_patches,
            )

        patcher.override_method(processor, "replace_image_token", replace_image_token)
        patcher.override_method(processor, "replace_video_token", replace_video_token)
        patcher.override_method(processor, "_get_num_multimodal_tokens", _get_num_multimodal_tokens)


register_adapter(InternVLAdapter())
