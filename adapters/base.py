"""The adapter interface every model family implements, and its registry.

A family adapter knows one family's internals (see DESIGN.md §3) and provides:

* ``model_types`` and ``model_classes``: the ``config.model_type`` strings it is
  registered under and the transformers classes it accepts (checked with
  ``isinstance``, never by name).
* :meth:`projector_slot`: ``(parent, attribute)`` of the module FlexProjector
  replaces, found by explicit attribute path.
* :meth:`projector_dims`: ``(in_dim, out_dim)`` of a FlexProjector for this model.
* :meth:`native_tokens`: the stock vision-token count per image / tile / patch,
  and :meth:`check_budget`, which rejects budgets the family cannot serve.
* :meth:`install`: make the model produce N tokens per unit under the budget in
  force (swap the slot, override instance methods), recording every change on the
  given :class:`Patcher` so that it can be undone.
* :meth:`patch_processor`: make the processor emit as many placeholders as the
  model will produce, again through a :class:`Patcher`.

Undo is generic: everything an adapter changes goes through ``Patcher.set``, and
``Patcher.undo`` restores the exact previous objects in reverse order. Transformers'
classes are never modified, only instances.
"""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from flexproj._types import Model
from flexproj.budget import current_tokens
from flexproj.errors import BudgetError, TokenCountMismatch, UnsupportedModelError
from flexproj.pooling import check_token_count
from flexproj.projector import FlexProjector

_MISSING = object()


class Patcher:
    """Records attribute changes on objects so they can be undone exactly."""

    def __init__(self) -> None:
        self._log: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, remembering what was there.

        Whether the old value lived in the instance (``__dict__``, or a Module's
        ``_modules``) or came from the class is remembered too, so undo deletes an
        instance override rather than freezing a class attribute onto the instance.
        """
        if isinstance(obj, nn.Module) and name in obj._modules:
            old: Any = obj._modules[name]
        else:
            old = vars(obj).get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING
        self._log.append((obj, name, old))
        setattr(obj, name, value)

    def override_method(self, obj: Any, name: str, func: Callable[..., Any]) -> None:
        """Bind ``func(obj, ...)`` as ``obj.name`` on this instance only."""
        self.set(obj, name, func.__get__(obj, type(obj)))

    def undo(self) -> None:
        while self._log:
            obj, name, old = self._log.pop()
            if old is _MISSING:
                if name in vars(obj):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)


@dataclass
class PatchState:
    """What ``flexproj.patch`` did to one model (stored as ``model.flexproj_state``)."""

    adapter: FamilyAdapter
    projector: FlexProjector
    default_tokens: int
    kernel: str
    model_patcher: Patcher = field(default_factory=Patcher)
    processor_patchers: list[tuple[Any, Patcher]] = field(default_factory=list)
    schedule: dict[str, Any] | None = None
    #: facts about the patched model that ``install`` records for ``patch_processor``,
    #: which does not see the model (e.g. InternVL's ViT patch size)
    model_facts: dict[str, Any] = field(default_factory=dict)

    def tokens(self) -> int:
        """The budget in force: the innermost ``flexproj.tokens`` block, else the default."""
        n = current_tokens(self.default_tokens)
        assert n is not None
        return n


class FamilyAdapter(abc.ABC):
    """Base class of the per-family adapters (see the module docstring)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    model_classes: ClassVar[tuple[type, ...]] = ()
    processor_classes: ClassVar[tuple[type, ...]] = ()
    #: what one budget unit is ("image", "tile", "image or temporal patch")
    unit: ClassVar[str] = "image"
    #: whether a budget above the native count is capped (True) or an error (False)
    caps_budget: ClassVar[bool] = False

    # --- model side -------------------------------------------------------
    @abc.abstractmethod
    def projector_slot(self, model: Model) -> tuple[nn.Module, str]:
        """``(parent, attribute)`` of the module the FlexProjector replaces."""

    @abc.abstractmethod
    def projector_dims(self, model: Model) -> tuple[int, int]:
        """``(in_dim, out_dim)`` of a FlexProjector for ``model``."""

    @abc.abstractmethod
    def native_tokens(self, model: Model) -> int:
        """Stock vision tokens per unit (an upper bound for budgets on this model)."""

    @abc.abstractmethod
    def install(self, model: Model, state: PatchState) -> None:
        """Make ``model`` produce ``state.tokens()`` tokens per unit; record changes on
        ``state.model_patcher``."""

    @abc.abstractmethod
    def patch_processor(self, processor: Any, state: PatchState, patcher: Patcher) -> None:
        """Make ``processor`` emit the placeholders the patched model expects."""

    # --- shared behaviour -------------------------------------------------
    def accepts(self, model: Model) -> bool:
        return isinstance(model, self.model_classes)

    def build_projector(
        self, model: Model, hidden_dim: int | None = None, kernel: str = "auto"
    ) -> FlexProjector:
        in_dim, out_dim = self.projector_dims(model)
        proj = FlexProjector(in_dim, out_dim, hidden_dim=hidden_dim, kernel=kernel)
        return proj.to(device=_device_of(model), dtype=_float_dtype_of(model))

    def check_budget(self, tokens: object, native: int) -> int:
        """Validate a budget against a native count; returns it. Raises :class:`BudgetError`."""
        try:
            n = check_token_count(tokens)
        except (TypeError, ValueError) as exc:
            raise BudgetError(str(exc)) from None
        if n > native and not self.caps_budget:
            raise BudgetError(
                f"a budget of {n} vision tokens per {self.unit} exceeds this model's native "
                f"{native}; pooling only removes tokens. Use flexproj.tokens(n) with n <= {native}."
            )
        return n

    def check_processor(self, processor: Any) -> None:
        if not isinstance(processor, self.processor_classes):
            names = ", ".join(c.__name__ for c in self.processor_classes)
            raise UnsupportedModelError(
                f"{type(self).__name__} patches processors of type {names}; got {type(processor).__name__}"
            )

    def guard_placeholder_count(self, base: Model, state: PatchState, image_token_id: int) -> None:
        """Turn transformers' placeholder/feature mismatch into one flexproj error.

        Every family funnels through ``get_placeholder_mask``, which raises a bare
        ``ValueError`` comparing element counts. The wrapper counts placeholders and
        feature rows itself and says which budget produced them and what to do.
        """
        original = base.get_placeholder_mask
        signature = inspect.signature(original)
        unit = self.unit

        @functools.wraps(original)
        def get_placeholder_mask(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except ValueError as exc:
                if "do not match" not in str(exc):
                    raise
                bound = signature.bind(*args, **kwargs)
                input_ids = bound.arguments.get("input_ids")
                embeds = bound.arguments.get("inputs_embeds")
                features = bound.arguments.get("image_features")
                if input_ids is None or embeds is None or features is None:
                    raise
                placeholders = int((input_ids == image_token_id).sum())
                rows = features.numel() // embeds.shape[-1]
                if placeholders == rows:
                    raise
                raise TokenCountMismatch(
                    f"the inputs carry {placeholders} image placeholder tokens but the patched "
                    f"model produced {rows} image features (budget: {state.tokens()} vision "
                    f"tokens per {unit}). Build the inputs with a processor patched by "
                    "flexproj.patch(model, processor), inside the same flexproj.tokens(n) block "
                    "that runs the model."
                ) from None

        state.model_patcher.set(base, "get_placeholder_mask", get_placeholder_mask)


def _device_of(model: Model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _float_dtype_of(model: Model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


_REGISTRY: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Register ``adapter`` under each of its ``model_types``; validates it first."""
    if not isinstance(adapter, FamilyAdapter):
        raise TypeError(f"register_adapter expects a FamilyAdapter instance, got {adapter!r}")
    if not adapter.model_types or not all(isinstance(t, str) and t for t in adapter.model_types):
        raise ValueError(f"{type(adapter).__name__}.model_types must be non-empty strings")
    if not adapter.model_classes or not all(isinstance(c, type) for c in adapter.model_classes):
        raise ValueError(f"{type(adapter).__name__}.model_classes must list transformers classes")
    for model_type in adapter.model_types:
        existing = _REGISTRY.get(model_type)
        if existing is not None and type(existing) is not type(adapter):
            raise ValueError(
                f"model_type {model_type!r} is already handled by {type(existing).__name__}"
            )
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def registered_adapters() -> dict[str, FamilyAdapter]:
    return dict(_REGISTRY)


def supported_models() -> list[str]:
    """The ``config.model_type`` strings flexproj can patch."""
    return sorted(_REGISTRY)


def adapter_for(model: Model) -> FamilyAdapter:
    """The adapter for ``model``, or :class:`UnsupportedModelError`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if adapter is None or not adapter.accepts(model):
        raise UnsupportedModelError(
            f"flexproj cannot patch {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(supported_models())}"
        )
    return adapter
