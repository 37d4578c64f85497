"""Gemma 3 (``Gemma3ForConditionalGeneration`` / ``Gemma3Model``): N tokens per image (or
pan-and-scan crop).

Stock data flow (transformers 5.23, ``Gemma3Model.get_image_features``)::

    pixel_values (crops, 3, S, S)           every image, then its pan-and-scan crops, if any
      -> vision_tower (SigLIP, no CLS)      (crops, G*G, C)      G = S / patch (64 at 896/14)
      -> multi_modal_projector:
           AvgPool2d(G / T) on the G x G grid  (crops, T*T, C)   T*T = mm_tokens_per_image (256)
           RMSNorm(C), matmul (C -> D)         (crops, T*T, D)

Gemma 3's stock projector already pools: any N is its generalisation. Patched, the slot is a
:class:`PooledGridProjector` and each crop gets ``(h, w) = flexproj.target_grid(N, grid)``
tokens:

* ``projector`` a FlexProjector (mode "flex"): adaptive-avg-pool G x G -> h x w, LayerNorm +
  SwiGLU (C -> D); any N up to G*G (4096 at 896 px).
* ``projector="stock"``, training-free, two ways (``flexproj.patch(..., stock_pooling=)``):

  - ``"after"`` (the default, as every family): the stock projector's T x T outputs,
    average-pooled to h x w (Matryoshka's pool-after);
  - ``"first"``: the G x G tower grid adaptive-average-pooled straight to h x w, then the
    stock RMSNorm and linear. Gemma's own AvgPool2d is this same pooling at N = T*T, so the
    stock weights see what they were trained on: means of tower patches, only over larger
    cells.

  Both allow N up to T*T and equal the stock model at N = T*T (``AvgPool2d`` with kernel
  G/T is ``adaptive_avg_pool2d`` to T x T when T divides G). They differ below it because
  the RMSNorm does not commute with the mean.

``get_image_features`` only calls the slot, so no method is overridden besides the shared
ones. Processor: ``Gemma3Processor.replace_image_token`` writes ``\\n\\n<boi>`` +
``image_seq_length`` soft tokens + ``<eoi>\\n\\n`` per image and per crop; the patched one
writes ``h*w`` soft tokens in each. The prompt's own image marker is ``<boi>``
(``processor.image_token``); the placeholder the model replaces is the soft token
(``tokenizer.image_token``, ``config.image_token_id``), which :meth:`placeholder_token` names.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Gemma3ForConditionalGeneration, Gemma3Model, Gemma3Processor

from flexproj._types import Model
from flexproj.family import FamilyAdapter, note_image
from flexproj.grid_slot import SquareGridSlot, install_square_slot, unit_tokens
from flexproj.patcher import Patcher, stock_method
from flexproj.pooling import Grid, pool_grid, target_grid
from flexproj.registry import register_adapter
from flexproj.state import PatchState, state_of

__all__ = ["Gemma3Adapter", "PooledGridProjector"]


class PooledGridProjector(SquareGridSlot):
    """Gemma 3's slot: :class:`~flexproj.grid_slot.SquareGridSlot`, plus the
    training-free pool-first path (``stock_pooling="first"``)."""

    def pool_project(self, state: PatchState, features: torch.Tensor, n: int) -> torch.Tensor:
        if self.projector is not None or state.stock_pooling != "first":
            return super().pool_project(state, features, n)
        stock: Any = self.stock  # Gemma3MultiModalProjector
        grid: Grid = (self.side, self.side)  # pool the tower grid, stock RMSNorm + linear
        pooled = pool_grid(features, grid, target_grid(n, grid))  # (crops, h*w, C)
        normed = stock.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, stock.mm_input_projection_weight).type_as(features)


def _output_grid(model: Model, mode: str) -> Grid:
    """The grid a budget pools per crop: the tower's G x G (flex) or the stock T x T."""
    vision = model.config.vision_config
    if mode == "flex":
        side = int(vision.image_size) // int(vision.patch_size)
    else:
        side = int(model.config.mm_tokens_per_image**0.5)
    return side, side


class Gemma3Adapter(FamilyAdapter):
    """Gemma 3: budget per image (and per pan-and-scan crop)."""

    model_types = ("gemma3",)
    model_classes: ClassVar[tuple[type, ...]] = (Gemma3ForConditionalGeneration, Gemma3Model)
    processor_classes: ClassVar[tuple[type, ...]] = (Gemma3Processor,)
    stock_poolings: ClassVar[tuple[str, ...]] = ("after", "first")
    nested_images = True
    expands_mixed_budgets = False  # mixed budgets: one (1, sum n_i, D) row (SquareGridSlot)
    unit = "image or crop"
    recipe = "gemma3"
    tiny = "flexproj.adapters.gemma3_tiny"

    def projector_slot(self, model: Model) -> tuple[nn.Module, str]:
        return self.base(model), "multi_modal_projector"

    def projector_dims(self, model: Model) -> tuple[int, int]:
        config = model.config
        return int(config.vision_config.hidden_size), int(config.text_config.hidden_size)

    def native_tokens(self, model: Model, mode: str = "flex") -> int:
        rows, cols = _output_grid(model, mode)
        return rows * cols

    def placeholder_token(self, processor: Any) -> str:
        """The soft token the model replaces (``processor.image_token`` is ``<boi>``)."""
        return str(processor.tokenizer.image_token)

    def install(self, model: Model, state: PatchState) -> None:
        side, stock_side = _output_grid(model, "flex")[0], _output_grid(model, "stock")[0]
        install_square_slot(
            state, self.base(model), "multi_modal_projector", side, stock_side, PooledGridProjector
        )

    def patch_processor(self, processor: Any, state: PatchState, patcher: Patcher) -> None:
        self.check_processor(processor)
        patcher.override_method(processor, "replace_image_token", _replace_image_token)


def _replace_image_token(self: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
    """Upstream's text for image ``image_idx`` (and its crops) with ``h*w`` soft tokens each."""
    state = state_of(self)
    if state is None or not state.enabled:
        return stock_method(self, "replace_image_token")(image_inputs, image_idx, **kwargs)
    crops = int(image_inputs["num_crops"][image_idx])
    budget = state.image_budgets(len(image_inputs["num_crops"]))[image_idx]
    count = unit_tokens(state, budget)  # soft tokens per image or crop
    note_image(image_idx, units=1 + crops, tokens=count * (1 + crops))
    tok = self.tokenizer
    sequence = f"\n\n{tok.boi_token}{tok.image_token * count}{tok.eoi_token}\n\n"
    if not crops:
        return sequence
    return (
        f"Here is the original image {sequence} and here are some crops to help you see better "
        + " ".join([sequence] * crops)
    )


register_adapter(Gemma3Adapter())
