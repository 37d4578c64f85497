"""flexproj's Qwen2-VL and Qwen2.5-VL for vLLM: vLLM's models with the merger replaced (images).

As in the transformers path (``adapters/qwen_vl.py``): the merger slot becomes a
pass-through that keeps one row per merged unit, so Qwen2.5-VL's ``reverse_indices``
(applied right after the merger) still restore the window order; then, per image, the
units go back to a row-major patch grid ``(t, H, W, C)``, which is average-pooled to
``(h', w') = flexproj.target_grid(N, (H/m, W/m))`` (capped at the native grid) and
projected by the FlexProjector. The processor emits ``t*h'*w'`` placeholders and stores
N per image in ``flexproj_tokens``; M-RoPE (``iter_mm_grid_thw``) lays positions out on
the pooled grid ``(t, h', w')``.

The three mixins (processing info, processor, model) hold everything; each Qwen
generation is the mixins over vLLM's classes of that generation (Qwen2-VL has no
windows, so its tower's order is already row-major by blocks). Videos are not served
(``limit_mm_per_prompt`` has no video entry).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from flexproj.pooling import pool_grid, target_grid
from flexproj.projector import FlexProjector
from flexproj.serving import vllm_common as common

UNIT = "image (per temporal patch, capped at the image's native count)"


def pooled_grid(grid_thw: Sequence[int], budget: int, merge: int) -> tuple[int, int, int]:
    """``(t, h', w')`` LLM tokens of an image of ``grid_thw = (t, H, W)`` patches."""
    t, H, W = (int(v) for v in grid_thw)
    h, w = target_grid(budget, (H // merge, W // merge))
    return t, h, w


class FlexQwenInfo:
    """Mixin over a Qwen ``*ProcessingInfo``: images only, the request's budget."""

    ctx: Any
    get_hf_config: Any  # both from the vLLM class mixed in after

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def merge_size(self) -> int:
        return int(self.get_hf_config().vision_config.spatial_merge_size)

    def budget(self, mm_kwargs: Mapping[str, object]) -> int:
        native = int(self.get_hf_config().text_config.max_position_embeddings)  # as the adapter
        default = common.default_budget(self.get_hf_config(), native)
        return common.budget_of(self.ctx, mm_kwargs, default, native, unit=UNIT, caps=True)


class FlexQwenProcessor(common.BudgetedProcessor):
    """Mixin over a Qwen ``*MultiModalProcessor``: ``t*h'*w'`` placeholders per image."""

    items_key = "image_grid_thw"

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id
        budget = self.info.budget(hf_processor_mm_kwargs)
        merge = self.info.merge_size()

        def replacement(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data  # (t, H, W)
            t, h, w = pooled_grid(grid.tolist(), budget, merge)
            return [image_token_id] * (t * h * w)

        return [
            PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)
        ]


class MergerPassThrough(nn.Module):
    """Stands in ``visual.merger``: ``(L, 1, C) -> (L/m², m²*C)``, one row per merged unit.

    Owns the FlexProjector (``visual.merger.projector``); pooling and projection happen
    in ``embed_multimodal`` once ``reverse_indices`` restored the unit order.
    """

    def __init__(self, projector: FlexProjector, merge_size: int) -> None:
        super().__init__()
        self.projector = projector
        self.merge_size = merge_size

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.reshape(-1, self.merge_size**2 * hidden_states.shape[-1])


_STOCK_MERGER = re.compile(r"(^|\.)visual\.merger\.")


class FlexQwenModel:
    """Mixin over a Qwen ``*ForConditionalGeneration``: a FlexProjector after the tower."""

    config: Any
    visual: Any

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.model_dir = vllm_config.model_config.model
        self.merge = int(self.config.vision_config.spatial_merge_size)
        native = int(self.config.text_config.max_position_embeddings)
        self.default_budget = common.default_budget(self.config, native)
        self.visual.merger = MergerPassThrough(common.build_projector(self.config), self.merge)

    @property
    def projector(self) -> FlexProjector:
        return self.visual.merger.projector

    def _budget_of(self, data: Mapping[str, Any]) -> int:
        field = data.get(common.BUDGET_FIELD)
        return self.default_budget if field is None else int(field.data)

    def iter_mm_grid_thw(
        self, mm_features: list[Any]
    ) -> Iterator[tuple[int, int, int, int, float]]:
        """M-RoPE on the pooled grid: ``(offset, t, h', w', 1.0)`` per image."""
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(f"flexproj's Qwen-VL serves images, got {feature.modality}")
            grid = feature.data["image_grid_thw"].data.tolist()
            t, h, w = pooled_grid(grid, self._budget_of(feature.data), self.merge)
            yield feature.mm_position.offset, t, h, w, 1.0

    def embed_multimodal(self, **kwargs: object) -> Any:
        budgets = kwargs.pop(common.BUDGET_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)  # type: ignore[attr-defined]
        if image_input is None:
            return []
        if image_input["type"] == "image_embeds":
            raise ValueError("flexproj's Qwen-VL takes pixel values, not image embeddings")
        grid_thw = image_input["image_grid_thw"]  # (images, 3)
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        units = self.visual(image_input["pixel_values"], grid_thw=[list(g) for g in grids])
        m = self.merge
        per_image = units.split([t * (H // m) * (W // m) for t, H, W in grids])
        out = []
        for x, (t, H, W), n in zip(
            per_image,
            grids,
            common.budgets_list(budgets, len(grids), self.default_budget),
            strict=True,
        ):
            # merged units (t*H/m*W/m, m*m*C), block-major -> row-major patches (t, H*W, C)
            patches = rearrange(
                x, "(t h w) (a b c) -> t (h a w b) c", t=t, h=H // m, w=W // m, a=m, b=m
            )
            _, h, w = pooled_grid((t, H, W), n, m)
            pooled = pool_grid(patches, (H, W), (h, w))  # (t, h*w, C)
            out.append(self.projector.project(pooled.reshape(t * h * w, -1)))  # (t*h*w, D)
        return tuple(out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        kept = common.skip_projector_weights(weights, self.projector, _STOCK_MERGER)
        loaded: set[str] = super().load_weights(kept)  # type: ignore[misc]
        return loaded | common.load_projector(
            self.projector, self.model_dir, "visual.merger.projector."
        )


# ----------------------------------------------------------------------------- Qwen2-VL


class FlexQwen2VLProcessingInfo(FlexQwenInfo, Qwen2VLProcessingInfo):
    pass


class FlexQwen2VLMultiModalProcessor(FlexQwenProcessor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    FlexQwen2VLMultiModalProcessor,
    info=FlexQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class FlexQwen2VLForConditionalGeneration(FlexQwenModel, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with a FlexProjector after the vision transformer (images)."""


# ----------------------------------------------------------------------------- Qwen2.5-VL


class FlexQwen2_5_VLProcessingInfo(FlexQwenInfo, Qwen2_5_VLProcessingInfo):
    pass


class FlexQwen2_5_VLMultiModalProcessor(FlexQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    FlexQwen2_5_VLMultiModalProcessor,
    info=FlexQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class FlexQwen2_5_VLForConditionalGeneration(FlexQwenModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with a FlexProjector after the vision transformer (images)."""
