"""The served families, keyed by transformers ``model_type`` (no vLLM import here).

One row per model type: the flexproj architecture name ``flexproj export`` writes into
``config.json``, the vLLM class that serves it (``"module:Class"``, imported by vLLM only
when it builds the model), and what ``flexproj export`` needs to know without vLLM:
the video processor vLLM loads with it. (The native count ``--tokens`` is checked
against comes from the family's adapter, as in ``flexproj.patch``.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServedFamily:
    architecture: str
    target: str  # "module:Class"
    #: the video processor class vLLM's processor for this family loads (exported with an
    #: image-only base processor, ``flexproj export`` adds one), or None
    video_processor: str | None = None


def _serving(module: str, cls: str) -> str:
    return f"flexproj.serving.{module}:{cls}"


FAMILIES: dict[str, ServedFamily] = {
    "llava": ServedFamily(
        "FlexprojLlavaForConditionalGeneration",
        _serving("vllm_llava", "FlexLlavaForConditionalGeneration"),
    ),
    "llava_next": ServedFamily(
        "FlexprojLlavaNextForConditionalGeneration",
        _serving("vllm_llava", "FlexLlavaNextForConditionalGeneration"),
    ),
    "llava_onevision": ServedFamily(
        "FlexprojLlavaOnevisionForConditionalGeneration",
        _serving("vllm_llava", "FlexLlavaOnevisionForConditionalGeneration"),
        video_processor="LlavaOnevisionVideoProcessor",
    ),
    "qwen2_vl": ServedFamily(
        "FlexprojQwen2VLForConditionalGeneration",
        _serving("vllm_qwen", "FlexQwen2VLForConditionalGeneration"),
        video_processor="Qwen2VLVideoProcessor",
    ),
    "qwen2_5_vl": ServedFamily(
        "FlexprojQwen2_5_VLForConditionalGeneration",
        _serving("vllm_qwen", "FlexQwen2_5_VLForConditionalGeneration"),
        video_processor="Qwen2VLVideoProcessor",
    ),
}
