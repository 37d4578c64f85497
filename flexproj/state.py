"""What ``flexproj.patch`` did to one model, and which path runs in this context.

A :class:`PatchState` is stored on the patched model and on the inner ``*Model`` that
owns the vision tower (attribute :data:`STATE_ATTR`), so method overrides and slot
modules find it from ``self`` at call time (see :mod:`flexproj.patcher` on copies).
Code outside core uses the public accessors (``flexproj.get_projector``,
``flexproj.patch_info``, ``flexproj.disabled``), not this object.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flexproj.budget import Budget, current_tokens
from flexproj.errors import BudgetError, PatchError
from flexproj.patcher import Patcher

if TYPE_CHECKING:
    from flexproj.family import FamilyAdapter

STATE_ATTR = "flexproj_state"

#: ``patch(..., native=...)``: what runs at the native budget
NATIVE_RULES = ("projector", "stock")

#: (budget, units per image) the inputs being run carry (flexproj.carried), set around a
#: model call: it wins over a flexproj.tokens block (which is checked against it first);
#: the units (crops, tiles) map a per-image budget list onto the rows the projector sees
_CALL: contextvars.ContextVar[tuple[Budget, tuple[int, ...] | None] | None] = (
    contextvars.ContextVar("flexproj_call_budget", default=None)
)

#: ids of the states whose stock path is switched on in this context (flexproj.disabled)
_DISABLED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "flexproj_disabled", default=frozenset()
)

__all__ = [
    "NATIVE_RULES",
    "STATE_ATTR",
    "PatchState",
    "call_budget",
    "check_native_rule",
    "disabled_state",
    "state_of",
]


def check_native_rule(native: Any) -> str:
    """``native`` if it is a native-budget rule (:data:`NATIVE_RULES`), else a PatchError."""
    if native not in NATIVE_RULES:
        raise PatchError(f"native must be one of {NATIVE_RULES}, got {native!r}")
    return str(native)


@dataclass(eq=False)
class PatchState:
    """The adapter, the installed projector, the default budget and the undo logs."""

    adapter: FamilyAdapter
    #: the module that projects: a FlexProjector, or the stock projector (mode "stock")
    projector: nn.Module
    default_budget: int
    #: stock vision tokens per budget unit, or None where it varies per image (Qwen)
    native_tokens: int | None
    #: "flex": FlexProjector, pool first; "stock": stock projector, outputs pooled
    mode: str = "flex"
    #: mode "stock": pool the stock projector's outputs ("after"), or the tower grid before
    #: the stock projector's own layers ("first"; families listing it in ``stock_poolings``)
    stock_pooling: str = "after"
    #: the native-budget rule: "stock" runs the stock projector for a unit at its stock
    #: count (``patch(..., native="stock")``); "projector": the FlexProjector runs there too
    native: str = "projector"
    model_patcher: Patcher = field(default_factory=Patcher)
    processor_patchers: list[tuple[Any, Patcher]] = field(default_factory=list)
    schedule: dict[str, Any] | None = None
    #: the budget-above-training warning was given (once per model)
    warned_above: bool = False
    #: facts about the patched model that ``install`` records for ``patch_processor``,
    #: which does not see the model (e.g. InternVL's ViT patch size)
    model_facts: dict[str, Any] = field(default_factory=dict)

    def budget(self) -> Budget:
        """The budget in force: what the running inputs carry, else the innermost
        ``flexproj.tokens`` block, else the default
        (an int for every image, or one int per image). While torch.compile traces: the
        default (Dynamo cannot read a ContextVar; see :mod:`flexproj.carried`)."""
        if torch.compiler.is_compiling():
            return self.default_budget
        call = _CALL.get()
        if call is not None:
            return call[0]
        n = current_tokens(self.default_budget)
        assert n is not None
        return n

    def image_budgets(self, n_images: int) -> list[int]:
        """One budget per image of a batch of ``n_images``; a per-image list must match."""
        spec = self.budget()
        if isinstance(spec, int):
            return [spec] * n_images
        if len(spec) != n_images:
            raise BudgetError(
                f"flexproj.tokens got {len(spec)} budgets for a batch of {n_images} images: "
                "give one budget per image, in the order the processor receives them, or one "
                "int for every image"
            )
        return list(spec)

    def unit_budgets(self, n_units: int, *, units_are_images: bool) -> list[int]:
        """One budget per projector row (crop, tile) of the running inputs."""
        spec = self.budget()
        if isinstance(spec, int):
            return [spec] * n_units
        call = _CALL.get()
        units = None if call is None else call[1]
        if units is None:
            if units_are_images:
                return self.image_budgets(n_units)
            raise BudgetError(
                f"per-image budgets {list(spec)}: which crops or tiles belong to which image is "
                "carried by the inputs a patched processor builds (flexproj_budgets); build the "
                "inputs with the processor patched for this model"
            )
        rows = [
            b for b, u in zip(self.image_budgets(len(units)), units, strict=True) for _ in range(u)
        ]
        if len(rows) != n_units:
            raise BudgetError(
                f"the inputs' {len(units)} images hold {len(rows)} crops/tiles but the model "
                f"received {n_units}"
            )
        return rows

    def runs_stock(self, budget: int, stock_count: int) -> bool:
        """The native-budget rule, asked per unit (image, crop, tile) by the slots: does a
        unit whose (capped) budget is ``budget`` run the stock projector, ``stock_count``
        being what the stock projector emits for it? Only with ``native="stock"`` and only
        at exactly the stock count; ``projector="stock"`` is the stock path there anyway."""
        if self.mode != "flex" or self.native != "stock":
            return False
        if budget == stock_count:
            return True
        trained = max(self.schedule["tokens"]) if self.schedule else None
        if trained is not None and trained < budget < stock_count and not self.warned_above:
            self.warned_above = True
            warnings.warn(
                f"flexproj: budget {budget} is above the largest budget this projector was "
                f"trained at ({trained}) and below the native {stock_count}: the FlexProjector "
                "extrapolates there and can lose much of its accuracy; use a trained budget or "
                "the native one (the stock projector). Said once per model.",
                stacklevel=2,
            )
        return False

    @property
    def enabled(self) -> bool:
        """False inside ``flexproj.disabled(model)`` in this context: run the stock path.
        A compiled graph always runs the patched path (Dynamo cannot read a ContextVar)."""
        if torch.compiler.is_compiling():
            return True
        return id(self) not in _DISABLED.get()

    def __deepcopy__(self, memo: dict[int, Any]) -> PatchState:
        # The copy shares the (stateless) adapter and starts with no patched processors:
        # a processor stays patched for the model it was patched with.
        new = object.__new__(type(self))
        memo[id(self)] = new
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "adapter":
                setattr(new, f.name, value)
            elif f.name == "processor_patchers":
                setattr(new, f.name, [])
            else:
                setattr(new, f.name, copy.deepcopy(value, memo))
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise PatchError(
            "a model or processor patched by flexproj cannot be pickled (its methods are "
            "instance overrides). Save the projector with flexproj.save_pretrained(model, path) "
            "and the model with model.save_pretrained(path), or flexproj.unpatch(model) first."
        )


def state_of(obj: Any) -> PatchState | None:
    """The :class:`PatchState` stored on a patched model, its inner model or a processor."""
    return getattr(obj, STATE_ATTR, None)


@contextlib.contextmanager
def call_budget(budget: Budget, units: tuple[int, ...] | None) -> Iterator[None]:
    """The budget and units per image the inputs being run carry (see
    :meth:`PatchState.budget` and :meth:`PatchState.unit_budgets`)."""
    token = _CALL.set((budget, units))
    try:
        yield
    finally:
        _CALL.reset(token)


@contextlib.contextmanager
def disabled_state(state: PatchState) -> Iterator[None]:
    token = _DISABLED.set(_DISABLED.get() | {id(state)})
    try:
        yield
    finally:
        _DISABLED.reset(token)
