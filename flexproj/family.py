"""The contract every model family implements (:class:`FamilyAdapter`), and the pieces
of it that are the same for every family: budget checks, the placeholder-count guard,
the record of which budget built which inputs, the stock-projector bookkeeping.

A family module (``flexproj.adapters.<family>``) subclasses :class:`FamilyAdapter` and
registers an instance with :func:`flexproj.registry.register_adapter`. It provides:

* ``model_types`` / ``model_classes`` / ``processor_classes``: the ``config.model_type``
  strings it serves and the transformers classes it accepts (``isinstance``, never names);
* :meth:`projector_slot`: ``(parent, attribute)`` of the module the projector replaces;
* :meth:`projector_dims`: ``(in_dim, out_dim)`` of a FlexProjector for this model;
* :meth:`native_tokens`: stock vision tokens per budget unit, ``None`` where it varies
  per image (Qwen: each image keeps its own grid);
* :meth:`install`: make the model produce the budget's tokens per unit, recording every
  change on ``state.model_patcher`` (method overrides through
  :meth:`~flexproj.patcher.Patcher.override_method`, reading the state from ``self`` with
  :func:`~flexproj.state.state_of`, so copies stay independent);
* :meth:`patch_processor`: make the processor emit as many placeholders as the model
  will produce, through the given :class:`~flexproj.patcher.Patcher`;
* optionally ``recipe`` (the ``flexproj.recipes`` module training it) and ``tiny``
  (variants for tests and demos), which the rest of the project reads from the registry.
"""

from __future__ import annotations

import abc
import contextvars
import dataclasses
import inspect
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from flexproj._types import Model
from flexproj.budget import budget_value, no_block
from flexproj.carried import BUDGETS_KEY, budget_scope, deal, decode, traced_check
from flexproj.encoder_cache import cached_tower_forward
from flexproj.errors import BudgetError, TokenCountMismatch, UnsupportedModelError
from flexproj.patcher import Patcher, stock_method
from flexproj.projector import FlexProjector
from flexproj.state import STATE_ATTR, PatchState, disabled_state, state_of

__all__ = ["MODALITIES", "FamilyAdapter", "check_count", "model_device_dtype"]

#: (modality, features argument of get_placeholder_mask, config attribute of its token id)
MODALITIES = (
    ("image", "image_features", "image_token_id"),
    ("video", "video_features", "video_token_id"),
)


def check_count(state: PatchState, kind: str, placeholders: int, produced: int) -> None:
    """The one placeholder/feature check: :class:`TokenCountMismatch` when they disagree."""
    if placeholders == produced:
        return
    raise TokenCountMismatch(
        f"{kind.capitalize()} features and {kind} tokens do not match: "
        f"the inputs carry {placeholders} {kind} placeholder tokens but the patched model "
        f"produces {produced} {kind} features (budget: {state.budget()} vision tokens per "
        f"{state.adapter.unit}). Build the inputs with a processor patched by "
        "flexproj.patch(model, processor) under the budget that runs the model: inside the "
        "same flexproj.tokens(n) block, or with no block around the model call (the model "
        "then uses the budget the inputs were built with)."
    )


def _count_placeholders(
    base: Model, input_ids: torch.Tensor | None, embeds: torch.Tensor, token_id: int
) -> int:
    if input_ids is not None:
        return int((input_ids == token_id).sum())
    # inputs_embeds only: placeholders are the rows equal to the token's embedding (as stock)
    token = torch.full((), token_id, dtype=torch.long, device=embeds.device)
    return int((embeds == base.get_input_embeddings()(token)).all(-1).sum())


def guarded_placeholder_mask(self: Model, *args: Any, **kwargs: Any) -> Any:
    """``get_placeholder_mask`` that checks counts first, for images and videos.

    Checked before transformers does, so it holds with ``TRANSFORMERS_DISABLE_TORCH_CHECK=1``
    too, and with one message for every family. While torch.compile traces, the count is
    data-dependent and the stock ``torch_compilable_check`` is what remains.
    """
    stock = stock_method(self, "get_placeholder_mask")
    if torch.compiler.is_compiling():  # first: nothing below may touch a ContextVar
        return stock(*args, **kwargs)
    state = state_of(self)
    if state is not None and state.enabled:
        bound = inspect.signature(stock).bind(*args, **kwargs)
        input_ids = bound.arguments.get("input_ids")
        embeds = bound.arguments.get("inputs_embeds")
        for kind, key, id_name in MODALITIES:
            features = bound.arguments.get(key)
            token_id = getattr(self.config, id_name, None)
            if features is None or embeds is None or token_id is None:
                continue
            features = features if isinstance(features, torch.Tensor) else torch.cat(features)
            placeholders = _count_placeholders(self, input_ids, embeds, token_id)
            check_count(state, kind, placeholders, features.numel() // embeds.shape[-1])
    return stock(*args, **kwargs)


#: (units, placeholder tokens) per image, noted by the processor call in progress
_NOTED: contextvars.ContextVar[list[tuple[int | None, int | None]] | None] = contextvars.ContextVar(
    "flexproj_noted_images", default=None
)


def int_budget(state: PatchState, what: str) -> int:
    """The budget in force where only one int makes sense (e.g. for videos)."""
    spec = state.budget()
    if not isinstance(spec, int):
        raise BudgetError(
            f"per-image budgets {list(spec)} apply to images; run {what} under one int budget "
            "(flexproj.tokens(n))"
        )
    return spec


def note_image(image_idx: int, *, units: int | None = None, tokens: int | None = None) -> None:
    """Called by a patched ``replace_image_token`` for image ``image_idx`` of the processor
    call in progress: how many projector rows (crops, tiles) that image becomes, and how
    many placeholder tokens it gets."""
    noted = list(_NOTED.get() or [])
    if image_idx == 0 and noted:  # image 0 noted again: a new processor call
        units_set, tokens_set = noted[0][0] is not None, noted[0][1] is not None
        if (units is not None and units_set) or (tokens is not None and tokens_set):
            noted = []
    while len(noted) <= image_idx:
        noted.append((None, None))
    old_units, old_tokens = noted[image_idx]
    noted[image_idx] = (
        old_units if units is None else units,
        old_tokens if tokens is None else tokens,
    )
    _NOTED.set(noted)


def run_with_input_budget(self: Model, name: str, args: tuple, kwargs: dict) -> Any:
    """Call stock ``name`` (``forward``, ``get_rope_index``) under the budget the inputs
    carry (:mod:`flexproj.carried`), else the ``flexproj.tokens`` block or default in force.

    While torch.compile traces, nothing but tensors and plain attributes is read (Dynamo
    cannot trace a ContextVar): the model runs at its default budget, and inputs carrying
    another one fail a traced runtime check instead of running at the wrong budget.
    """
    stock = stock_method(self, name)
    value = kwargs.pop(BUDGETS_KEY, None)
    if torch.compiler.is_compiling():  # first: nothing below may touch a ContextVar
        state = state_of(self)
        if isinstance(value, torch.Tensor) and state is not None:
            traced_check(value, state.default_budget)
        return stock(*args, **kwargs)
    state = state_of(self)
    if state is None or not state.enabled:
        return stock(*args, **kwargs)
    with budget_scope(state, value):
        return stock(*args, **kwargs)


def _forward_with_input_budget(self: Model, *args: Any, **kwargs: Any) -> Any:
    return run_with_input_budget(self, "forward", args, kwargs)


def _generate_with_input_budget(self: Model, *args: Any, **kwargs: Any) -> Any:
    """``generate`` keeps :data:`~flexproj.carried.BUDGETS_KEY` in its model kwargs, so it
    is expanded with the samples (``num_return_sequences``, beams) and every forward step
    reads it; an explicit block is checked against it once, here, before the expansion."""
    stock = stock_method(self, "generate")
    state = state_of(self)
    value = kwargs.get(BUDGETS_KEY)
    if torch.compiler.is_compiling() or state is None or not state.enabled:
        return stock(*args, **kwargs)
    carried = decode(value)
    if carried is None:
        return stock(*args, **kwargs)
    if not isinstance(carried.budget, int) and not state.adapter.expands_mixed_budgets:
        config = kwargs.get("generation_config") or self.generation_config
        copies = [
            kwargs.get(k, getattr(config, k, 1)) or 1 for k in ("num_beams", "num_return_sequences")
        ]
        if max(copies) > 1:
            raise BudgetError(
                f"per-image budgets {list(carried.per_image)} that differ: {type(self).__name__}'s "
                "image features are one row for the whole batch then, which generate cannot "
                "copy per sample for num_beams / num_return_sequences > 1. Generate each sample "
                "alone, or with one budget for every image."
            )
    # the block is checked here, before the expansion; then the carried budgets rule: the
    # images encoded before the first step (transformers 5.23+) at the unexpanded ones, each
    # forward step at what its (expanded) inputs carry
    with budget_scope(state, value), no_block():
        return stock(*args, **kwargs)


def _accept_budgets_key(method: Any) -> None:
    """Give the ``forward`` override the stock signature plus a keyword-only
    :data:`~flexproj.carried.BUDGETS_KEY`: ``generate`` checks its model kwargs against it."""
    stock = inspect.signature(method)
    params = list(stock.parameters.values())
    extra = inspect.Parameter(BUDGETS_KEY, inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    first = inspect.signature(method.__func__).parameters  # with ``self``
    self_param = [next(iter(first.values()))]
    method.__func__.__signature__ = stock.replace(
        parameters=[*self_param, *params[:at], extra, *params[at:]]
    )


def _attach_budgets(self: Any, text: Any, text_inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """Processor hook after tokenisation: the inputs carry the budgets that built them."""
    result = stock_method(self, "_check_special_mm_tokens")(text, text_inputs, *args, **kwargs)
    state = state_of(self)
    noted = _NOTED.get()
    _NOTED.set(None)
    if state is not None and state.enabled:
        rows = deal(
            text_inputs["input_ids"], state.budget(), noted, getattr(self, "image_token_id", None)
        )
        if rows is not None:
            text_inputs[BUDGETS_KEY] = rows
    return result


def _num_multimodal_tokens(self: Any, image_sizes: Any = None, **kwargs: Any) -> Any:
    """Patched ``_get_num_multimodal_tokens`` (what serving engines read): the counts the
    patched processor emits, found by running its own ``replace_image_token`` on a blank
    image of each size, patched and stock, and shifting the stock count by the difference."""
    data = stock_method(self, "_get_num_multimodal_tokens")(image_sizes=image_sizes, **kwargs)
    state = state_of(self)
    if image_sizes is None or state is None or not state.enabled or not data.num_image_tokens:
        return data
    counts = []
    for stock_count, (height, width) in zip(data.num_image_tokens, image_sizes, strict=True):
        blank = np.zeros((int(height), int(width), 3), dtype=np.uint8)
        inputs = dict(self.image_processor(images=[blank], return_tensors="pt"))
        inputs.setdefault("batch_num_images", [1])
        patched = self.replace_image_token(inputs, 0).count(self.image_token)
        with disabled_state(state):
            stock = self.replace_image_token(inputs, 0).count(self.image_token)
        counts.append(stock_count + patched - stock)
    return dataclasses.replace(data, num_image_tokens=counts)


def model_device_dtype(model: Model) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of ``model``'s parameters (CPU, float32 without any)."""
    device, dtype = torch.device("cpu"), torch.float32
    for p in model.parameters():
        device = p.device
        if p.is_floating_point():
            return device, p.dtype
    return device, dtype


class FamilyAdapter(abc.ABC):
    """Base class of the per-family adapters (see the module docstring)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    model_classes: ClassVar[tuple[type, ...]] = ()
    processor_classes: ClassVar[tuple[type, ...]] = ()
    #: what one budget unit is ("image", "tile", "image or temporal patch")
    unit: ClassVar[str] = "image"
    #: whether a budget above the native count is capped (True) or an error (False)
    caps_budget: ClassVar[bool] = False
    #: the flexproj.recipes module that trains this family (``flexproj train <recipe>``)
    recipe: ClassVar[str | None] = None
    #: the module declaring this family's tiny variants (``TINY``) and bench shape (``BENCH``)
    tiny: ClassVar[str | None] = None
    #: whether generate can copy per-sample image features under per-image budgets that
    #: differ (num_beams, num_return_sequences); False refuses those calls clearly
    expands_mixed_budgets: ClassVar[bool] = True

    # --- model side -------------------------------------------------------
    @abc.abstractmethod
    def projector_slot(self, model: Model) -> tuple[nn.Module, str]:
        """``(parent, attribute)`` of the module the FlexProjector replaces."""

    @abc.abstractmethod
    def projector_dims(self, model: Model) -> tuple[int, int]:
        """``(in_dim, out_dim)`` of a FlexProjector for ``model``."""

    @abc.abstractmethod
    def native_tokens(self, model: Model, mode: str = "flex") -> int | None:
        """Most tokens per unit the patched path can give (``mode`` "flex": the tower's patch
        grid; "stock": the stock projector's output grid); ``None`` where each image keeps
        its own count."""

    @abc.abstractmethod
    def install(self, model: Model, state: PatchState) -> None:
        """Make ``model`` produce ``state.budget()`` tokens per unit; record changes on
        ``state.model_patcher``."""

    @abc.abstractmethod
    def patch_processor(self, processor: Any, state: PatchState, patcher: Patcher) -> None:
        """Make ``processor`` emit the placeholders the patched model expects."""

    def base(self, model: Model) -> nn.Module:
        """The inner ``*Model`` that owns the vision tower and ``get_placeholder_mask``."""
        return model.model if hasattr(model, "model") and hasattr(model, "lm_head") else model

    def vision_tower(self, model: Model) -> nn.Module:
        """The vision encoder (what :func:`flexproj.encoder_cache.vision_cache` caches)."""
        base: Model = self.base(model)
        tower: nn.Module = base.vision_tower
        return tower

    # --- shared behaviour -------------------------------------------------
    def accepts(self, model: Model) -> bool:
        return isinstance(model, self.model_classes)

    def build_projector(
        self, model: Model, hidden_dim: int | None = None, kernel: str = "auto"
    ) -> FlexProjector:
        in_dim, out_dim = self.projector_dims(model)
        proj = FlexProjector(in_dim, out_dim, hidden_dim=hidden_dim, kernel=kernel)
        device, dtype = model_device_dtype(model)
        return proj.to(device=device, dtype=dtype)

    def check_budget(self, budget: object, native: int | None) -> int:
        """Validate a budget against a native count; returns it. Raises :class:`BudgetError`."""
        n = budget_value(budget)
        if native is not None and n > native and not self.caps_budget:
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

    def install_common(self, model: Model, state: PatchState) -> None:
        """What every family's patch does besides its own ``install``: the state on the
        model and its inner model, the stock projector kept in the tree (frozen), the
        count guard, and the budget-from-inputs wrappers."""
        patcher = state.model_patcher
        base = self.base(model)
        for obj in {id(model): model, id(base): base}.values():
            patcher.set(obj, STATE_ATTR, state)
        patcher.override_method(base, "get_placeholder_mask", guarded_placeholder_mask)
        patcher.override_method(model, "forward", _forward_with_input_budget)
        _accept_budgets_key(model.forward)
        patcher.override_method(self.vision_tower(model), "forward", cached_tower_forward)
        if hasattr(model, "generate"):
            patcher.override_method(model, "generate", _generate_with_input_budget)

    def install_processor_common(self, processor: Any, state: PatchState, patcher: Patcher) -> None:
        patcher.set(processor, STATE_ATTR, state)
        patcher.override_method(processor, "_check_special_mm_tokens", _attach_budgets)
        if hasattr(processor, "_get_num_multimodal_tokens"):
            patcher.override_method(processor, "_get_num_multimodal_tokens", _num_multimodal_tokens)

    def freeze_stock(self, stock: nn.Module, state: PatchState) -> None:
        """The stock projector stays in the module tree (it follows ``.to()``) but takes no
        gradient while a FlexProjector is installed (DDP would flag it unused). With
        ``projector="stock"`` it is the projector, and stays as it was."""
        if state.mode != "flex":
            return
        for param in stock.parameters():
            if param.requires_grad:
                state.model_patcher.set(param, "requires_grad", False)
