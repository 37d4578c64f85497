"""``model_type`` -> family adapter, loading each family module on first use.

The built-in table names where each family lives; nothing is imported until a model of
that type is patched (or a caller asks for every family), so a family whose
transformers classes are missing from the installed release fails alone, with an
error naming what is missing, while the others still patch. Third-party families call
:func:`register_family` (lazy) or :func:`register_adapter` (an instance).
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING

from flexproj._types import Model
from flexproj.errors import UnsupportedModelError

if TYPE_CHECKING:
    from flexproj.family import FamilyAdapter

__all__ = [
    "FamilyUnavailable",
    "adapter_for",
    "get_adapter",
    "load_adapters",
    "register_adapter",
    "register_family",
    "supported_models",
]

#: model_type -> module whose import registers its adapter
_FAMILY_MODULES: dict[str, str] = {
    "llava": "flexproj.adapters.llava",
    "llava_next": "flexproj.adapters.llava",
    "llava_onevision": "flexproj.adapters.llava",
    "qwen2_vl": "flexproj.adapters.qwen_vl",
    "qwen2_5_vl": "flexproj.adapters.qwen_vl",
    "qwen3_vl": "flexproj.adapters.qwen_vl",
    "qwen3_5": "flexproj.adapters.qwen3_5",
    "internvl": "flexproj.adapters.internvl",
    "gemma3": "flexproj.adapters.gemma3",
    "smolvlm": "flexproj.adapters.smolvlm",
}
_ADAPTERS: dict[str, FamilyAdapter] = {}


class FamilyUnavailable(UnsupportedModelError):
    """A known family whose module cannot be imported here (e.g. a transformers class
    missing from the installed release)."""


def register_family(model_type: str, module: str) -> None:
    """Declare that importing ``module`` registers the adapter for ``model_type``."""
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}")
    if not isinstance(module, str) or not module:
        raise ValueError(f"module must be a dotted module path, got {module!r}")
    known = _FAMILY_MODULES.get(model_type)
    if known is not None and known != module:
        raise ValueError(f"model_type {model_type!r} is already declared by {known}")
    _FAMILY_MODULES[model_type] = module


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Register ``adapter`` under each of its ``model_types``; validates it first."""
    from flexproj.family import FamilyAdapter

    if not isinstance(adapter, FamilyAdapter):
        raise TypeError(f"register_adapter expects a FamilyAdapter instance, got {adapter!r}")
    name = type(adapter).__name__
    if not adapter.model_types or not all(isinstance(t, str) and t for t in adapter.model_types):
        raise ValueError(f"{name}.model_types must be non-empty strings")
    if not adapter.model_classes or not all(isinstance(c, type) for c in adapter.model_classes):
        raise ValueError(f"{name}.model_classes must list transformers classes")
    for model_type in adapter.model_types:
        existing = _ADAPTERS.get(model_type)
        if existing is not None and type(existing) is not type(adapter):
            raise ValueError(
                f"model_type {model_type!r} is already handled by {type(existing).__name__}"
            )
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
        _FAMILY_MODULES.setdefault(model_type, type(adapter).__module__)
    return adapter


def supported_models() -> list[str]:
    """The ``config.model_type`` strings flexproj can patch (imports no family)."""
    return sorted(_FAMILY_MODULES.keys() | _ADAPTERS.keys())


def get_adapter(model_type: str) -> FamilyAdapter:
    """The adapter for ``model_type``, importing its family module on first use."""
    adapter = _ADAPTERS.get(model_type)
    if adapter is not None:
        return adapter
    module = _FAMILY_MODULES.get(model_type)
    if module is None:
        raise UnsupportedModelError(
            f"flexproj has no adapter for model_type={model_type!r}; supported model types: "
            f"{', '.join(supported_models())}"
        )
    try:
        importlib.import_module(module)
    except ImportError as exc:
        import transformers

        raise FamilyUnavailable(
            f"the flexproj family for model_type={model_type!r} ({module}) cannot load with "
            f"transformers {transformers.__version__}: {exc}. Other families are unaffected; "
            "install a transformers release that has this class."
        ) from exc
    adapter = _ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(f"importing {module} registered no adapter for {model_type!r}")
    return adapter


def load_adapters() -> dict[str, FamilyAdapter]:
    """Every family that loads here, by model_type (those that cannot load are warned about)."""
    loaded = {}
    for model_type in supported_models():
        try:
            loaded[model_type] = get_adapter(model_type)
        except FamilyUnavailable as exc:
            warnings.warn(str(exc), stacklevel=2)
    return loaded


def adapter_for(model: Model) -> FamilyAdapter:
    """The adapter for ``model``, or :class:`UnsupportedModelError`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or model_type not in supported_models():
        raise UnsupportedModelError(
            f"flexproj cannot patch {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(supported_models())}"
        )
    adapter = get_adapter(model_type)
    if not adapter.accepts(model):
        raise UnsupportedModelError(
            f"flexproj cannot patch {type(model).__name__} (model_type={model_type!r}): the "
            f"{type(adapter).__name__} accepts "
            f"{', '.join(c.__name__ for c in adapter.model_classes)}"
        )
    return adapter
