"""The served families, keyed by transformers ``model_type`` (no vLLM import here).

One row per model type: the flexproj architecture name ``flexproj export`` writes into
``config.json``, the vLLM class that serves it (``"module:Class"``, imported by vLLM only
when it builds the model), and what ``flexproj export`` needs to know without vLLM:
the native vision-token count of one budget unit (``None`` where the budget is capped
per image instead, as Qwen's is) and the video processor vLLM loads with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServedFamily:
    architecture: str
    target: str  # "module:Class"
    #: native tokens per budget unit from ``config.json``, or None (capped per image)
    native_tokens: Callable[[Mapping[str, Any]], int] | None
    #: the video processor class vLLM's processor for this family loads (exported with an
    #: image-only base processor, ``flexproj export`` adds one), or None
    video_processor: str | None = None


def tower_grid_tokens(config: Mapping[str, Any]) -> int:
    """``(image_size // patch_size)²``: one image (crop) of a CLIP/SigLIP tower."""
    vision = config["vision_config"]
    return int((int(vision["image_size"]) // int(vision["patch_size"])) ** 2)


def _serving(module: str, cls: str) -> str:
    return f"flexproj.serving.{module}:{cls}"


FAMILIES: dict[str, ServedFamily] = {
    "llava": ServedFamily(
        "FlexprojLlavaForConditionalGeneration",
        _serving("vllm_llava", "FlexLlavaForConditionalGeneration"),
        tower_grid_tokens,
    ),
    "llava_next": ServedFamily(
        "FlexprojLlavaNextForConditionalGeneration",
        _serving("vllm_llava", "FlexLlavaNextForConditionalGeneration"),
        tower_grid_tokens,
    ),
    "llava_onevision": ServedFamily(
        "FlexprojLlavaOnevisionForConditionalGeneration",
        _serving("vllm_llava", "FlexLlavaOnevisionForConditionalGeneration"),
        tower_grid_tokens,
        video_processor="LlavaOnevisionVideoProcessor",
    ),
    "qwen2_vl": ServedFamily(
        "FlexprojQwen2VLForConditionalGeneration",
        _serving("vllm_qwen", "FlexQwen2VLForConditionalGeneration"),
        None,
        video_processor="Qwen2VLVideoProcessor",
    ),
    "qwen2_5_vl": ServedFamily(
        "FlexprojQwen2_5_VLForConditionalGeneration",
        _serving("vllm_qwen", "FlexQwen2_5_VLForConditionalGeneration"),
        None,
        video_processor="Qwen2VLVideoProcessor",
    ),
}
