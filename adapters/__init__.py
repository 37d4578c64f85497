"""Per-family adapters (installed as ``flexproj.adapters``); importing registers them."""

from flexproj.adapters import internvl as _internvl  # noqa: F401
from flexproj.adapters import llava as _llava  # noqa: F401  (registers the LLaVA family)
from flexproj.adapters import qwen_vl as _qwen_vl  # noqa: F401
from flexproj.adapters.base import (
    FamilyAdapter,
    Patcher,
    PatchState,
    adapter_for,
    register_adapter,
    registered_adapters,
    supported_models,
)

__all__ = [
    "FamilyAdapter",
    "PatchState",
    "Patcher",
    "adapter_for",
    "register_adapter",
    "registered_adapters",
    "supported_models",
]
