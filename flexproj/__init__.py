"""flexproj: variable vision-token projectors for Hugging Face VLMs (TokenFLEX).

Swap a VLM's projector for a :class:`FlexProjector`, keep its processor's
placeholders in step, and pick the number of vision tokens per call::

    model = flexproj.patch(model, processor, tokens=144)
    with flexproj.tokens(64):
        out = model.generate(**processor(text=..., images=...))
"""

from flexproj._version import __version__
from flexproj.adaptive import AdaptiveOutput, adaptive_generate
from flexproj.budget import current_tokens, tokens
from flexproj.checkpoint import save_pretrained
from flexproj.errors import (
    BudgetError,
    CheckpointError,
    FlexprojError,
    PatchError,
    TokenCountMismatch,
    UnsupportedModelError,
)
from flexproj.kernels import BackendUnavailable, available_backends
from flexproj.loading import from_pretrained
from flexproj.patching import (
    PatchInfo,
    disabled,
    get_projector,
    is_patched,
    patch,
    patch_info,
    patch_processor,
    set_native,
    unpatch,
    unpatch_processor,
)
from flexproj.pooling import pool_grid, pool_packed, target_grid
from flexproj.projector import FlexProjector
from flexproj.registry import FamilyUnavailable, supported_models

__all__ = [
    "AdaptiveOutput",
    "BackendUnavailable",
    "BudgetError",
    "CheckpointError",
    "FamilyUnavailable",
    "FlexProjector",
    "FlexprojError",
    "PatchError",
    "PatchInfo",
    "TokenCountMismatch",
    "UnsupportedModelError",
    "__version__",
    "adaptive_generate",
    "available_backends",
    "current_tokens",
    "disabled",
    "from_pretrained",
    "get_projector",
    "is_patched",
    "patch",
    "patch_info",
    "patch_processor",
    "pool_grid",
    "pool_packed",
    "save_pretrained",
    "set_native",
    "supported_models",
    "target_grid",
    "tokens",
    "unpatch",
    "unpatch_processor",
]
