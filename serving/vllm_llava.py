"""flexproj's LLaVA-1.5 for vLLM: vLLM's LLaVA with a FlexProjector in the projector slot.

vLLM's vision tower and language model are kept. Per request the processor reads the
budget N from ``mm_processor_kwargs={"tokens": N}`` (default: the checkpoint's), emits
``h*w`` placeholders per image (``(h, w) = flexproj.target_grid(N, (side, side))``) and
stores N per image in the processed field ``flexproj_tokens``, which reaches
``embed_multimodal``: there the tower's ``(images, side*side, C)`` CLS-dropped patch
features are pooled and projected by ``FlexProjector(x, tokens=N, grid=(side, side))``,
exactly as the transformers path (``adapters/llava.py``) does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from flexproj.pooling import target_grid
from flexproj.serving import vllm_common as common

ARCHITECTURE = "FlexprojLlavaForConditionalGeneration"


class FlexLlavaProcessingInfo(LlavaProcessingInfo):
    """Counts placeholders from the request's budget instead of the image size."""

    def grid_side(self) -> int:
        vision = self.get_hf_config().vision_config
        return int(vision.image_size) // int(vision.patch_size)

    def native_tokens(self) -> int:
        return self.grid_side() ** 2

    def budget(self, mm_kwargs: Mapping[str, object]) -> int:
        native = self.native_tokens()
        default = common.default_budget(self.get_hf_config(), native)
        return common.budget_of(self.ctx, mm_kwargs, default, native, unit="image", caps=False)

    def tokens_for(self, budget: int) -> int:
        h, w = target_grid(budget, (self.grid_side(), self.grid_side()))
        return h * w

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        return {"image": self.native_tokens()}  # the largest budget a request may ask for


class FlexLlavaMultiModalProcessor(common.BudgetedProcessor, LlavaMultiModalProcessor):
    items_key = "pixel_values"

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index
        count = self.info.tokens_for(self.info.budget(hf_processor_mm_kwargs))

        def replacement(item_idx: int) -> list[int]:
            # resolved per item, as upstream does: on a processor-cache hit mm_items is empty
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):  # precomputed embeddings: as given
                return [image_token_id] * images.get_feature_size(item_idx)
            return [image_token_id] * count

        return [
            PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)
        ]


# CLIP/SigLIP keys as transformers 5 saves them (``vision_tower.encoder...``, or
# ``model.vision_tower.encoder...``) -> vLLM's ``vision_tower.vision_model.encoder...``
_VISION_KEYS = WeightsMapper(
    orig_to_new_regex={
        re.compile(r"^(?:model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."
    }
)
_STOCK_PROJECTOR = re.compile(r"(^|\.)multi_modal_projector\.")


@MULTIMODAL_REGISTRY.register_processor(
    FlexLlavaMultiModalProcessor,
    info=FlexLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class FlexLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with ``multi_modal_projector`` a :class:`flexproj.FlexProjector`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.model_dir = vllm_config.model_config.model
        vision = self.config.vision_config
        self.grid_side = int(vision.image_size) // int(vision.patch_size)
        self.default_budget = common.default_budget(self.config, self.grid_side**2)
        with self._mark_tower_model(vllm_config, "image"):
            self.multi_modal_projector = common.build_projector(self.config)

    def embed_multimodal(self, **kwargs: object) -> Any:
        budgets = kwargs.pop(common.BUDGET_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            return image_input["data"]
        features = self._process_image_pixels(image_input)  # (images, L, C)
        if not isinstance(features, torch.Tensor):
            features = torch.stack(list(features))
        side = self.grid_side
        drop_cls = features.shape[1] == side * side + 1  # strategy "full" on a CLIP tower

        def project(idx: list[int], n: int) -> torch.Tensor:
            x = features[idx]  # (k, L, C) -> (k, h*w, D)
            return self.multi_modal_projector(x, tokens=n, grid=(side, side), drop_cls=drop_cls)

        per_image = common.budgets_list(budgets, features.shape[0], self.default_budget)
        return common.by_budget(per_image, project)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        projector = self.multi_modal_projector
        kept = common.skip_projector_weights(weights, projector, _STOCK_PROJECTOR)
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(kept, mapper=_VISION_KEYS | self.hf_to_vllm_mapper)
        return loaded | common.load_projector(projector, self.model_dir, "multi_modal_projector.")
