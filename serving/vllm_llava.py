"""flexproj's LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision for vLLM: vLLM's models with a
FlexProjector in the projector slot.

vLLM's vision tower and language model are kept. Per request the processor reads the
budget N from ``mm_processor_kwargs={"tokens": N}`` (default: the checkpoint's) and stores
it per image in the processed field ``flexproj_tokens``, which reaches ``embed_multimodal``:
there the tower's ``(crops, side*side, C)`` patch features are pooled and projected by
``FlexProjector(x, tokens=N, grid=(side, side))``, exactly as the transformers path
(``adapters/llava.py``) does. Placeholders per image:

* LLaVA-1.5: ``h*w`` with ``(h, w) = flexproj.target_grid(N, (side, side))``;
* NeXT / OneVision (AnyRes, N per crop): the base crop's ``h*w`` plus the stitched,
  unpadded crops and one newline per row, counted by the transformers adapter's own
  ``unpadded_count`` (OneVision's ``anyres_max_N`` downsampling included) and packed by
  its ``_pack_anyres``, so served and transformers counts and features are one code path.
  Images only (OneVision's videos are not served). vLLM tiles every image of a
  multi-image OneVision prompt (transformers uses the base crop only there, stock as
  patched), so multi-image OneVision prompts follow vLLM's layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from flexproj.adapters.llava import LlavaNextAdapter, _pack_anyres
from flexproj.pooling import target_grid
from flexproj.registry import get_adapter
from flexproj.serving import vllm_common as common


def _grid_side(config: Any) -> int:
    vision = config.vision_config
    return int(vision.image_size) // int(vision.patch_size)


class FlexLlavaInfo:
    """Mixin over a LLaVA-family ``*ProcessingInfo``: the budget and the placeholder count."""

    ctx: Any
    get_hf_config: Any  # both from the vLLM class mixed in after
    unit = "image"

    def grid_side(self) -> int:
        return _grid_side(self.get_hf_config())

    def native_tokens(self) -> int:
        return self.grid_side() ** 2

    def budget(self, mm_kwargs: Mapping[str, object]) -> int:
        native = self.native_tokens()
        default = common.default_budget(self.get_hf_config(), native)
        return common.budget_of(self.ctx, mm_kwargs, default, native, unit=self.unit, caps=False)

    def crop_grid(self, budget: int) -> tuple[int, int]:
        return target_grid(budget, (self.grid_side(), self.grid_side()))

    def image_tokens(self, budget: int, width: int, height: int) -> int:
        h, w = self.crop_grid(budget)
        return h * w

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        return {"image": self.max_image_tokens()}  # the largest budget a request may ask for

    def max_image_tokens(self) -> int:
        return self.native_tokens()


class FlexAnyresInfo(FlexLlavaInfo):
    """NeXT / OneVision: N per crop; the count is the transformers adapter's."""

    unit = "image crop"
    get_hf_processor: Any
    get_image_size_with_most_features: Any

    def image_tokens(self, budget: int, width: int, height: int) -> int:
        config = self.get_hf_config()
        adapter = get_adapter(config.model_type)
        assert isinstance(adapter, LlavaNextAdapter)
        side = self.crop_grid(budget)
        crop = int(config.vision_config.image_size)
        unpadded, newlines = adapter.unpadded_count(
            self.get_hf_processor(), side, (height, width), (crop, crop)
        )
        return side[0] * side[1] + unpadded + newlines

    def max_image_tokens(self) -> int:
        size = self.get_image_size_with_most_features()
        return self.image_tokens(self.native_tokens(), size.width, size.height)


class FlexLlavaProcessor(common.BudgetedProcessor):
    """Mixin over a LLaVA-family ``*MultiModalProcessor``: the budget's placeholder counts."""

    items_key = "pixel_values"

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index
        budget = self.info.budget(hf_processor_mm_kwargs)

        def replacement(item_idx: int) -> list[int]:
            # resolved per item, as upstream does: on a processor-cache hit mm_items is empty
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):  # precomputed embeddings: as given
                return [image_token_id] * images.get_feature_size(item_idx)
            size = images.get_image_size(item_idx)
            return [image_token_id] * self.info.image_tokens(budget, size.width, size.height)

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


class FlexLlavaModel:
    """Mixin over a LLaVA-family ``*ForConditionalGeneration``: the FlexProjector slot."""

    config: Any
    multi_modal_projector: Any
    hf_to_vllm_mapper: WeightsMapper
    _mark_tower_model: Any
    tower_modalities: Any = "image"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.model_dir = vllm_config.model_config.model
        self.grid_side = _grid_side(self.config)
        self.default_budget = common.default_budget(self.config, self.grid_side**2)
        with self._mark_tower_model(vllm_config, self.tower_modalities):
            self.multi_modal_projector = common.build_projector(self.config)

    def project(self, features: torch.Tensor, budget: int) -> torch.Tensor:
        """``(crops, [1 +] side*side, C) -> (crops, h*w, D)`` (a leading CLS dropped)."""
        side = self.grid_side
        drop_cls = features.shape[1] == side * side + 1  # strategy "full" on a CLIP tower
        return self.multi_modal_projector(
            features, tokens=budget, grid=(side, side), drop_cls=drop_cls
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        projector = self.multi_modal_projector
        kept = common.skip_projector_weights(weights, projector, _STOCK_PROJECTOR)
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(kept, mapper=_VISION_KEYS | self.hf_to_vllm_mapper)
        return loaded | common.load_projector(projector, self.model_dir, "multi_modal_projector.")


# ----------------------------------------------------------------------------- LLaVA-1.5


class FlexLlavaProcessingInfo(FlexLlavaInfo, LlavaProcessingInfo):
    pass


class FlexLlavaMultiModalProcessor(FlexLlavaProcessor, LlavaMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    FlexLlavaMultiModalProcessor,
    info=FlexLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class FlexLlavaForConditionalGeneration(FlexLlavaModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA with ``multi_modal_projector`` a :class:`flexproj.FlexProjector`."""

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

        def project(idx: list[int], n: int) -> torch.Tensor:
            return self.project(features[idx], n)  # (k, L, C) -> (k, h*w, D)

        per_image = common.budgets_list(budgets, features.shape[0], self.default_budget)
        return common.by_budget(per_image, project)


# ----------------------------------------------------------------------------- AnyRes


class FlexAnyresModel(FlexLlavaModel):
    """NeXT / OneVision: per image, crops projected under its budget, then AnyRes packing."""

    vision_tower: Any
    image_newline: Any
    _image_pixels_to_features: Any
    _parse_and_validate_image_input: Any
    max_num_patches: int | None = None

    def crop_count(self, image_size: Any) -> int:
        """The base crop plus the tiles of an image of ``image_size = (height, width)``."""
        rows, cols = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        return 1 + int(rows) * int(cols)

    def embed_multimodal(self, **kwargs: object) -> Any:
        budgets = kwargs.pop(common.BUDGET_FIELD, None)
        for key in ("pixel_values_videos", "video_embeds"):
            if kwargs.get(key) is not None:
                raise ValueError("flexproj's LLaVA-OneVision serves images, not videos")
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            return image_input["data"]
        pixels = image_input["pixel_values"]  # (images, crops, 3, S, S) or a list of (crops, ...)
        sizes = image_input["image_sizes"]  # (images, 2): original (height, width)
        # the processor pads a prompt's images to one crop count: keep each image's own
        per_image = [p[: self.crop_count(size)] for p, size in zip(pixels, sizes, strict=True)]
        counts = [int(p.shape[0]) for p in per_image]
        features = self._image_pixels_to_features(self.vision_tower, torch.cat(per_image))
        projected = [
            self.project(f, n)  # (crops, h*w, D)
            for f, n in zip(
                features.split(counts),
                common.budgets_list(budgets, len(counts), self.default_budget),
                strict=True,
            )
        ]
        packed, _ = _pack_anyres(self, projected, sizes, self.image_newline, self.max_num_patches)
        return packed


class FlexLlavaNextProcessingInfo(FlexAnyresInfo, LlavaNextProcessingInfo):
    pass


class FlexLlavaNextMultiModalProcessor(FlexLlavaProcessor, LlavaNextMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    FlexLlavaNextMultiModalProcessor,
    info=FlexLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class FlexLlavaNextForConditionalGeneration(FlexAnyresModel, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with a FlexProjector per crop and flexproj's AnyRes packing."""


class FlexLlavaOnevisionProcessingInfo(FlexAnyresInfo, LlavaOnevisionProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}


class FlexLlavaOnevisionMultiModalProcessor(FlexLlavaProcessor, LlavaOnevisionMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    FlexLlavaOnevisionMultiModalProcessor,
    info=FlexLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class FlexLlavaOnevisionForConditionalGeneration(
    FlexAnyresModel, LlavaOnevisionForConditionalGeneration
):
    """vLLM's LLaVA-OneVision (images) with a FlexProjector per crop, ``anyres_max_N``."""

    tower_modalities = {"image", "video"}  # noqa: RUF012 (upstream's value)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        ratio = str(getattr(self.config, "vision_aspect_ratio", "anyres_max_9"))
        self.max_num_patches = int(ratio.removeprefix("anyres_max_"))
