"""SmolVLM (``SmolVLMForConditionalGeneration`` / ``SmolVLMModel``): N tokens per tile.

The SmolVLM image processor resizes an image (longest edge ``size``), cuts it into
``rows x cols`` tiles of ``max_image_size`` pixels and adds the whole image, resized to one
tile, as a global view (a small image that needs no split is its global view only). The
budget N applies to every tile, global view included: an image of ``r x c`` tiles costs
``(r*c + 1) * N`` tokens.

Stock data flow (transformers 5.23, ``SmolVLMModel.get_image_features``)::

    pixel_values (batch, max tiles, 3, S, S)   zero-padded per sample; all-zero tiles dropped
      -> vision_model (SigLIP-like, no CLS)    (tiles, G*G, C)       G = S / patch
      -> connector:
           pixel_shuffle(scale s)              (tiles, G/s * G/s, s*s*C)
           linear (s*s*C -> D)                 (tiles, (G/s)^2, D)    = image_seq_len
      -> split per sample, flattened, scattered over the <image> placeholders

    (SmolVLM-256M/500M: 512 px tiles, patch 16, s = 4: 32x32 -> 8x8 = 64 per tile.)

Patched, the connector slot is a :class:`~flexproj.grid_slot.SquareGridSlot`
(``get_image_features`` only calls it, so nothing else is overridden besides the shared
methods): the FlexProjector pools the G x G tower grid (input width C, not s*s*C: the pixel
shuffle is replaced, as for InternVL), any N up to G*G (1024 at 512 px); with
``projector="stock"`` the stock connector's (G/s) x (G/s) outputs are pooled, N up to
``image_seq_len``.

Processor: ``SmolVLMProcessor.replace_image_token`` writes, per tile, ``<fake_token_around_image>
<row_i_col_j>`` + ``image_seq_len`` ``<image>`` tokens, then ``<fake_token_around_image>
<global-img>`` + ``image_seq_len`` for the global view; the patched one writes the pooled
``h*w`` in each, through upstream's own ``get_image_prompt_string``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import SmolVLMForConditionalGeneration, SmolVLMModel, SmolVLMProcessor
from transformers.models.smolvlm import processing_smolvlm

from flexproj._types import Model
from flexproj.family import FamilyAdapter, note_image
from flexproj.grid_slot import install_square_slot, unit_tokens
from flexproj.patcher import Patcher, stock_method
from flexproj.pooling import Grid
from flexproj.registry import register_adapter
from flexproj.state import PatchState, state_of

__all__ = ["SmolVLMAdapter"]

if not hasattr(SmolVLMModel, "get_placeholder_mask"):  # (transformers 5.19 merges inline)
    raise ImportError(
        "SmolVLMModel has no get_placeholder_mask in this transformers release (5.23 has it): "
        "flexproj's placeholder/feature check has nothing to guard"
    )


def _grid(model: Model, mode: str) -> Grid:
    """Per tile: the tower's G x G (flex) or the stock connector's G/s x G/s (stock)."""
    vision = model.config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    if mode != "flex":
        side //= int(model.config.scale_factor)
    return side, side


class SmolVLMAdapter(FamilyAdapter):
    """SmolVLM: budget per tile (global view included)."""

    model_types = ("smolvlm",)
    model_classes: ClassVar[tuple[type, ...]] = (SmolVLMForConditionalGeneration, SmolVLMModel)
    processor_classes: ClassVar[tuple[type, ...]] = (SmolVLMProcessor,)
    unit = "tile"
    nested_images = True
    recipe = "smolvlm"
    tiny = "flexproj.adapters.smolvlm_tiny"

    def base(self, model: Model) -> SmolVLMModel:
        return model if isinstance(model, SmolVLMModel) else model.model

    def vision_tower(self, model: Model) -> nn.Module:
        tower: nn.Module = self.base(model).vision_model
        return tower

    def projector_slot(self, model: Model) -> tuple[nn.Module, str]:
        return self.base(model), "connector"

    def projector_dims(self, model: Model) -> tuple[int, int]:
        # the pixel shuffle is replaced: the projector sees the tower width C, not s*s*C
        config = model.config
        return int(config.vision_config.hidden_size), int(config.text_config.hidden_size)

    def native_tokens(self, model: Model, mode: str = "flex") -> int:
        rows, cols = _grid(model, mode)
        return rows * cols

    def install(self, model: Model, state: PatchState) -> None:
        side, stock_side = _grid(model, "flex")[0], _grid(model, "stock")[0]
        base = self.base(model)
        install_square_slot(state, base, "connector", side, stock_side, pad_units=True)
        state.model_patcher.override_method(base, "get_image_features", _get_image_features)

    def patch_processor(self, processor: Any, state: PatchState, patcher: Patcher) -> None:
        self.check_processor(processor)
        patcher.override_method(processor, "replace_image_token", _replace_image_token)


def _get_image_features(self: Model, *args: Any, **kwargs: Any) -> Any:
    """Stock ``get_image_features``; under per-image budgets that differ, the slot's
    zero-padded ``(tiles, n_max, D)`` rows are trimmed to each tile's count."""
    stock = stock_method(self, "get_image_features")
    state = state_of(self)
    if state is None or not state.enabled:
        return stock(*args, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    return_dict = self.config.return_dict if return_dict is None else return_dict
    output = stock(*args, return_dict=True, **kwargs)
    per_sample = output.pooler_output  # [(tiles_i * n, D)] per sample
    budgets = state.unit_budgets(output.last_hidden_state.shape[0], units_are_images=True)
    if len(set(budgets)) > 1:
        counts = [unit_tokens(state, n) for n in budgets]  # per tile, in order
        longest, start, trimmed = max(counts), 0, []
        for features in per_sample:  # (tiles_i * longest, D)
            k = features.shape[0] // longest
            rows = features.reshape(k, longest, -1)
            trimmed.append(
                torch.cat([r[:c] for r, c in zip(rows, counts[start : start + k], strict=True)])
            )
            start += k
        output.pooler_output = trimmed
    return output if return_dict else output.to_tuple()


def _replace_image_token(self: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
    """Upstream's prompt string for image ``image_idx`` with ``h*w`` tokens per tile."""
    state = state_of(self)
    if state is None or not state.enabled:
        return stock_method(self, "replace_image_token")(image_inputs, image_idx, **kwargs)
    rows = [r for per_sample in image_inputs["rows"] for r in per_sample]
    cols = [c for per_sample in image_inputs["cols"] for c in per_sample]
    budget = state.image_budgets(len(rows))[image_idx]
    count = unit_tokens(state, budget)  # <image> tokens per tile
    tiles = rows[image_idx] * cols[image_idx]
    units = tiles + 1 if tiles else 1  # the tiles and the global view, or the global view
    note_image(image_idx, units=units, tokens=units * count)
    return str(
        processing_smolvlm.get_image_prompt_string(
            rows[image_idx],
            cols[image_idx],
            count,
            fake_token_around_image=self.fake_image_token,
            image_token=self.image_token,
            global_image_token=self.global_image_token,
        )
    )


register_adapter(SmolVLMAdapter())
