"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision.

All three keep the projector at ``model.model.multi_modal_projector`` and feed it
``(images or crops, L, C)`` row-major patch features, so one slot module serves
them: it pools each crop's square grid to the budget and projects. What differs:

* LLaVA-1.5: nothing else; the processor's count comes from the pooled grid.
* NeXT / OneVision (AnyRes): ``pack_image_features`` reads the per-crop grid side
  from ``vision_config.image_size // patch_size``, which is wrong once crops are
  pooled; it is replaced on the instance by :func:`_pack_anyres`, which takes the
  side from the real feature count and otherwise follows upstream (unpad, OneVision's
  ``anyres_max_N`` downsampling, ``image_newline``). The processors count with the
  pooled side through their own ``_get_unpadded_features``.

CLS: under ``vision_feature_select_strategy="default"`` transformers has already
dropped it. Under ``"full"`` a CLIP tower's CLS arrives first; it is not a grid
cell, so the slot drops it explicitly (SigLIP towers have none).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionProcessor,
    LlavaProcessor,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from flexproj._types import Model
from flexproj.family import FamilyAdapter, note_image
from flexproj.patcher import Patcher, stock_method
from flexproj.pooling import pool_grid, target_grid
from flexproj.registry import register_adapter
from flexproj.state import STATE_ATTR, PatchState, state_of


class GridSlotProjector(nn.Module):
    """Stands in the projector slot: ``(crops, L, C)`` in; out, see :meth:`forward`.

    ``L`` is the tower's square patch grid, plus one leading CLS token when the tower
    has one and the ``"full"`` strategy kept it (dropped here, explicitly). The stock
    projector stays inside as ``stock`` (it follows ``.to()``; ``flexproj.disabled`` runs it).
    """

    def __init__(
        self, projector: nn.Module | None, stock: nn.Module, side: int, has_cls: bool, anyres: bool
    ) -> None:
        super().__init__()
        self.projector = projector  # None with projector="stock"
        self.stock = stock
        self.side = side
        self.has_cls = has_cls
        self.anyres = anyres  # rows are crops of images (NeXT / OneVision), else images

    def extra_repr(self) -> str:
        return f"grid={self.side}x{self.side}, has_cls={self.has_cls}"

    def forward(self, features: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``features (rows, L, C)``, a row per image (LLaVA-1.5) or crop (AnyRes). Returns
        ``(rows, n, out_dim)`` when every row has one budget (the stock projector's own
        output when flexproj is disabled); with per-image budgets, a list of ``(n_i,
        out_dim)`` (LLaVA-1.5) or ``(rows, max n_i, out_dim)`` zero-padded (AnyRes: the
        packer trims each image to its count)."""
        state = state_of(self)
        if state is None or not state.enabled:
            return self.stock(features)
        L = features.shape[1]
        drop_cls = self.has_cls and self.side**2 + 1 == L
        if not drop_cls and self.side**2 != L:
            raise ValueError(
                f"the vision tower gave {L} tokens per image, expected the {self.side}x{self.side} "
                f"grid ({self.side**2}){' or grid + CLS' if self.has_cls else ''}. Is "
                "vision_feature_select_strategy='default' used with a tower without CLS?"
            )
        budgets = state.unit_budgets(features.shape[0], units_are_images=not self.anyres)
        for budget in set(budgets):
            state.adapter.check_budget(budget, self.side**2)
        if len(set(budgets)) == 1:
            return self._pool_project(features, budgets[0], drop_cls)
        # per-image budgets: each row alone, (n_i, D)
        rows = [
            self._pool_project(features[i : i + 1], n, drop_cls)[0] for i, n in enumerate(budgets)
        ]
        if not self.anyres:  # LLaVA-1.5's get_image_features lists per-image features anyway
            return rows
        # AnyRes: (rows, n_max, D), zero-padded; the packer trims each image to its count
        longest = max(r.shape[0] for r in rows)
        return torch.stack([nn.functional.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows])

    def _pool_project(self, features: torch.Tensor, budget: int, drop_cls: bool) -> torch.Tensor:
        """``(rows, [1 +] S*S, C) -> (rows, n, D)``: pool + project (FlexProjector), or
        project + pool (``projector="stock"``, and the native-budget rule: the stock
        projector alone at the native budget)."""
        grid = (self.side, self.side)
        state = state_of(self)
        if self.projector is None or (state and state.runs_stock(budget, self.side**2)):
            out = self.stock(features[:, 1:] if drop_cls else features)  # (rows, S*S, D)
            return pool_grid(out, grid, target_grid(budget, grid))
        return self.projector(features, tokens=budget, grid=grid, drop_cls=drop_cls)


def _tower_side(config: Any) -> int:
    vision = config.vision_config
    return int(vision.image_size) // int(vision.patch_size)


def _has_cls(vision_tower: Model) -> bool:
    embeddings = getattr(vision_tower, "embeddings", None)
    if embeddings is None:  # CLIPVisionModel wraps a CLIPVisionTransformer
        embeddings = getattr(getattr(vision_tower, "vision_model", None), "embeddings", None)
    return hasattr(embeddings, "class_embedding")


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration`` / ``LlavaModel``)."""

    model_types = ("llava",)
    model_classes: ClassVar[tuple[type, ...]] = (LlavaForConditionalGeneration, LlavaModel)
    processor_classes: ClassVar[tuple[type, ...]] = (LlavaProcessor,)
    unit = "image"
    recipe = "llava"
    tiny = "flexproj.adapters.llava_tiny"
    #: replaces ``pack_image_features`` (AnyRes families), or None
    packer: ClassVar[Callable[..., Any] | None] = None

    def base(self, model: Model) -> nn.Module:
        """The ``*Model`` that owns the vision tower and projector."""
        return model if hasattr(model, "multi_modal_projector") else model.model

    def projector_slot(self, model: Model) -> tuple[nn.Module, str]:
        return self.base(model), "multi_modal_projector"

    def projector_dims(self, model: Model) -> tuple[int, int]:
        config = model.config
        layers = config.vision_feature_layer
        n_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
        return config.vision_config.hidden_size * n_layers, config.text_config.hidden_size

    def native_tokens(self, model: Model, mode: str = "flex") -> int:
        return _tower_side(model.config) ** 2  # the stock projector keeps the grid

    def install(self, model: Model, state: PatchState) -> None:
        base: Model = self.base(model)
        stock: nn.Module = base.multi_modal_projector
        self.freeze_stock(stock, state)
        slot = GridSlotProjector(
            state.projector if state.mode == "flex" else None,
            stock,
            _tower_side(model.config),
            _has_cls(base.vision_tower),
            anyres=self.packer is not None,
        )
        state.model_patcher.set(slot, STATE_ATTR, state)
        state.model_patcher.set(base, "multi_modal_projector", slot)
        if self.packer is not None:
            state.model_patcher.override_method(base, "pack_image_features", self.packer)

    # --- processor ---------------------------------------------------------
    def crop_tokens(self, processor: Any, budget: int, crop_hw: tuple[int, int]) -> tuple[int, int]:
        """Pooled grid of one crop of ``crop_hw`` pixels under ``budget``."""
        native = self.native_crop_grid(processor, crop_hw)
        return target_grid(self.check_budget(budget, native[0] * native[1]), native)

    def native_crop_grid(self, processor: Any, crop_hw: tuple[int, int]) -> tuple[int, int]:
        patch = int(processor.patch_size)
        return crop_hw[0] // patch, crop_hw[1] // patch

    def image_token_count(
        self, processor: Any, state: PatchState, image_inputs: dict, image_idx: int
    ) -> int:
        """Placeholders for image ``image_idx`` of a processor call, under the budget."""
        pixel_values = image_inputs["pixel_values"]
        budget = state.image_budgets(len(pixel_values))[image_idx]
        height, width = pixel_values[image_idx].shape[-2:]
        h, w = self.crop_tokens(processor, budget, (int(height), int(width)))
        note_image(image_idx, units=1)
        return h * w

    def patch_processor(self, processor: Any, state: PatchState, patcher: Patcher) -> None:
        self.check_processor(processor)
        patcher.override_method(processor, "replace_image_token", _replace_image_token)


def _replace_image_token(self: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
    """Patched ``replace_image_token`` of a LLaVA-family processor: pooled count per image."""
    state = state_of(self)
    if state is None or not state.enabled:
        return stock_method(self, "replace_image_token")(image_inputs, image_idx, **kwargs)
    adapter = cast(LlavaAdapter, state.adapter)
    count = adapter.image_token_count(self, state, image_inputs, image_idx)
    note_image(image_idx, tokens=count)
    return self.image_token * count


def _anyres_max_shape(height: int, width: int, max_patches: int, side: int) -> tuple[int, int]:
    """OneVision's ``anyres_max_N`` downsampling of an unpadded ``height x width`` grid of
    crops of ``side x side`` tokens: upstream's formula, except that no side drops below 1
    (at budgets of 1-3 tokens a tall or wide image reaches ``int(w // ratio) == 0``, which
    upstream's interpolate rejects). The model (:func:`_pack_anyres`) and the processor's
    count (:meth:`LlavaOnevisionAdapter.unpadded_count`) both use it, so they agree."""
    ratio = math.sqrt(height * width / (max_patches * side**2))
    if ratio <= 1.1:
        return height, width
    return max(1, int(height // ratio)), max(1, int(width // ratio))


def _pack_anyres(
    base: Model,
    image_features: list[torch.Tensor],
    image_sizes: torch.Tensor,
    image_newline: torch.Tensor | None,
    max_num_patches: int | None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """AnyRes packing with the per-crop grid side taken from the pooled features.

    Each ``image_features[i]`` is ``(crops, n, D)``: crop 0 is the whole image (kept
    as is), the others tile the best-fit resolution and are stitched into one grid,
    unpadded to the image's aspect ratio, optionally downsampled (OneVision), and
    given a newline embedding per row.
    """
    config = base.config
    packed, lens = [], []
    for image_idx, feature in enumerate(image_features):
        if feature.shape[0] > 1:
            base_feature, crops = feature[0], feature[1:]
            side = math.isqrt(crops.shape[1])
            if side * side != crops.shape[1]:
                raise ValueError(
                    f"AnyRes crops must pool to a square grid, got {crops.shape[1]} tokens"
                )
            rows, cols = get_anyres_image_grid_shape(
                image_sizes[image_idx], config.image_grid_pinpoints, config.vision_config.image_size
            )
            # (rows*cols, side*side, D) -> (D, rows*side, cols*side)
            grid = crops.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3)
            grid = unpad_image(grid.flatten(1, 2).flatten(2, 3), image_sizes[image_idx])
            if max_num_patches is not None:
                size = _anyres_max_shape(grid.shape[1], grid.shape[2], max_num_patches, side)
                if size != tuple(grid.shape[1:]):
                    grid = nn.functional.interpolate(grid[None], size, mode="bilinear")[0]
            if image_newline is not None:
                newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1)
                grid = torch.cat((grid, newline.to(grid)), dim=-1)
            feature = torch.cat((base_feature, grid.flatten(1, 2).transpose(0, 1)), dim=0)
        else:
            feature = feature[0]
            if image_newline is not None:
                feature = torch.cat((feature, image_newline[None].to(feature)), dim=0)
        packed.append(feature)
        lens.append(feature.shape[0])
    return packed, torch.tensor(lens, dtype=torch.long, device=image_features[0].device)


def _pack_next_impl(
    self: nn.Module,
    image_features: Any,
    image_sizes: Any,
    vision_feature_select_strategy: Any = None,
    image_newline: Any = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Patched ``LlavaNextModel.pack_image_features``."""
    state = state_of(self)
    if state is None or not state.enabled:
        stock = stock_method(self, "pack_image_features")
        return stock(image_features, image_sizes, vision_feature_select_strategy, image_newline)
    features = _trim_to_budgets(self, state, image_features)
    return _pack_anyres(self, features, image_sizes, image_newline, None)


def _pack_onevision_impl(
    self: nn.Module,
    image_features: Any,
    image_sizes: Any,
    image_newline: Any = None,
    vision_aspect_ratio: str = "anyres_max_9",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Patched ``LlavaOnevisionModel.pack_image_features``."""
    state = state_of(self)
    if state is None or not state.enabled:
        stock = stock_method(self, "pack_image_features")
        return stock(image_features, image_sizes, image_newline, vision_aspect_ratio)
    max_patches = int(vision_aspect_ratio.removeprefix("anyres_max_"))
    features = _trim_to_budgets(self, state, image_features)
    return _pack_anyres(self, features, image_sizes, image_newline, max_patches)


def _trim_to_budgets(
    base: Model, state: PatchState, image_features: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Each image's ``(crops, n_max, D)`` rows cut to its own budget's count (the slot
    zero-pads rows when images have different budgets)."""
    side = _tower_side(base.config)
    budgets = state.image_budgets(len(image_features))
    out = []
    for feature, budget in zip(image_features, budgets, strict=True):
        h, w = target_grid(budget, (side, side))
        out.append(feature[:, : h * w])
    return out


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (AnyRes): budget per crop, base image included."""

    model_types = ("llava_next",)
    model_classes: ClassVar[tuple[type, ...]] = (LlavaNextForConditionalGeneration, LlavaNextModel)
    processor_classes: ClassVar[tuple[type, ...]] = (LlavaNextProcessor,)
    unit = "image crop"

    packer: ClassVar[Callable[..., Any] | None] = staticmethod(_pack_next_impl)

    def crop_layout(self, processor: Any, orig: Any, crop_hw: Any) -> tuple[int, int]:
        """``(rows, cols)`` of crops the processor tiles an image of size ``orig`` into."""
        best_h, best_w = select_best_resolution(
            tuple(orig), processor.image_processor.image_grid_pinpoints
        )
        return best_h // crop_hw[0], best_w // crop_hw[1]

    def unpadded_count(
        self, processor: Any, side: tuple[int, int], orig: Any, crop_hw: Any
    ) -> tuple[int, int]:
        """``(unpadded tokens, newline tokens)`` of the stitched crops."""
        rows, cols = self.crop_layout(processor, orig, crop_hw)
        return processor._get_unpadded_features(orig[0], orig[1], side[0], side[1], rows, cols)

    def image_token_count(
        self, processor: Any, state: PatchState, image_inputs: dict, image_idx: int
    ) -> int:
        """Base crop + stitched, unpadded crops + one newline per row, all pooled."""
        orig = image_inputs["image_sizes"][image_idx]
        orig = orig.tolist() if hasattr(orig, "tolist") else list(orig)
        crop_h, crop_w = (int(s) for s in image_inputs["pixel_values"][0][0].shape[-2:])
        budget = state.image_budgets(len(image_inputs["image_sizes"]))[image_idx]
        side = self.crop_tokens(processor, budget, (crop_h, crop_w))
        if self.base_crop_only(processor, image_inputs, image_idx):
            note_image(image_idx, units=1)
            return side[0] * side[1] + 1  # base crop + newline
        rows, cols = self.crop_layout(processor, orig, (crop_h, crop_w))
        note_image(image_idx, units=1 + rows * cols)  # base crop + the tiling crops
        unpadded, newlines = self.unpadded_count(processor, side, orig, (crop_h, crop_w))
        return unpadded + newlines + side[0] * side[1]

    def base_crop_only(self, processor: Any, image_inputs: dict, image_idx: int) -> bool:
        return False


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: AnyRes with ``anyres_max_N`` downsampling; multi-image
    samples use the base crop only."""

    model_types = ("llava_onevision",)
    model_classes: ClassVar[tuple[type, ...]] = (
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionModel,
    )
    processor_classes: ClassVar[tuple[type, ...]] = (LlavaOnevisionProcessor,)

    packer: ClassVar[Callable[..., Any] | None] = staticmethod(_pack_onevision_impl)

    def unpadded_count(
        self, processor: Any, side: tuple[int, int], orig: Any, crop_hw: Any
    ) -> tuple[int, int]:
        """As the model packs them: upstream's unpadding (run on an empty grid, so the
        arithmetic is the model's own), then :func:`_anyres_max_shape`. The processor's
        own ``_get_unpadded_features`` would count 0 columns where the model keeps 1."""
        rows, cols = self.crop_layout(processor, orig, crop_hw)
        empty = torch.empty((0, rows * side[0], cols * side[1]))
        height, width = unpad_image(empty, [int(orig[0]), int(orig[1])]).shape[1:]
        max_patches = int(processor.vision_aspect_ratio.removeprefix("anyres_max_"))
        height, width = _anyres_max_shape(height, width, max_patches, side[0])
        return height * width, height

    def native_crop_grid(self, processor: Any, crop_hw: tuple[int, int]) -> tuple[int, int]:
        side = math.isqrt(int(processor.num_image_tokens))  # the processor has no patch_size
        return side, side

    def base_crop_only(self, processor: Any, image_inputs: dict, image_idx: int) -> bool:
        seen = 0
        for n in image_inputs["batch_num_images"]:
            if image_idx < seen + n:
                return n != 1  # multi-image samples: base crop only
            seen += n
        return False


register_adapter(LlavaAdapter())
register_adapter(LlavaNextAdapter())
register_adapter(LlavaOnevisionAdapter())
