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
import collections
import contextlib
import contextvars
import dataclasses
import hashlib
import inspect
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from flexproj._types import Model
from flexproj.budget import Budget, budget_value, current_tokens, tokens
from flexproj.errors import BudgetError, TokenCountMismatch, UnsupportedModelError
from flexproj.patcher import Patcher, stock_method
from flexproj.projector import FlexProjector
from flexproj.state import STATE_ATTR, PatchState, call_units, disabled_state, state_of

__all__ = ["MODALITIES", "FamilyAdapter", "InputsLedger", "check_count", "model_device_dtype"]

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
    state = state_of(self)
    if state is not None and state.enabled and not torch.compiler.is_compiling():
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


#: what a ledger holds for one sample (one row of input_ids): its images' budgets (an int
#: for all of them), and the units (crops, tiles) of each of its images, or None where the
#: family did not say
Built = tuple[Budget, tuple[int, ...] | None]

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


def _rows(input_ids: Any, attention_mask: Any) -> list[np.ndarray]:
    """Each sample's token ids without padding (``attention_mask`` 0)."""
    ids = np.asarray(input_ids.detach().cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    ids = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
    if attention_mask is None:
        return [row.astype(np.int64) for row in ids]
    mask = np.asarray(
        attention_mask.detach().cpu()
        if isinstance(attention_mask, torch.Tensor)
        else attention_mask
    ).reshape(ids.shape)
    return [row[m.astype(bool)].astype(np.int64) for row, m in zip(ids, mask, strict=True)]


class InputsLedger:
    """Which budget built which inputs, per sample: the sample's ``input_ids`` (padding
    stripped) -> (its images' budgets, their units), the latest 4096 samples.

    The processors patched for a model record every sample they build. The model, called
    with no ``flexproj.tokens`` block in force (a worker thread, a later step of a
    streaming generator, an executor), runs under the budgets its inputs were built with;
    per-image budgets are mapped onto crops and tiles with the recorded units. Samples are
    keyed one by one, so a batch collated from separately processed samples, a sub-batch
    or a re-padded batch is recognised too. One ledger per patched model, so what one
    model does never depends on another's history; a deep copy starts with a copy of it.
    """

    capacity = 4096

    def __init__(self) -> None:
        self._budgets: collections.OrderedDict[bytes, Built] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(row: np.ndarray, vision_ids: Sequence[int]) -> bytes | None:
        """The sample's ids up to its last image / video placeholder (what follows, e.g. an
        answer a training batch appends, does not change its images), or None without any."""
        hits = np.flatnonzero(np.isin(row, list(vision_ids)))
        if not hits.size:
            return None
        return hashlib.blake2b(row[: hits[-1] + 1].tobytes(), digest_size=16).digest()

    def record(
        self,
        input_ids: Any,
        attention_mask: Any,
        budget: Budget,
        images: Sequence[tuple[int | None, int | None]] | None,
        vision_ids: Sequence[int],
    ) -> None:
        """Record a processor call's samples; ``images``: (units, tokens) per image;
        ``vision_ids``: the image placeholder id first, then the video one, if any."""
        if not vision_ids:
            return
        rows = _rows(input_ids, attention_mask)
        entries: list[Built] = [(budget, None)] * len(rows)
        if images is not None:
            entries = self._per_row(rows, budget, images, vision_ids[0]) or entries
        with self._lock:
            for row, entry in zip(rows, entries, strict=True):
                key = self.key(row, vision_ids)
                if key is None:
                    continue
                self._budgets[key] = entry
                self._budgets.move_to_end(key)
            while len(self._budgets) > self.capacity:
                self._budgets.popitem(last=False)

    @staticmethod
    def _per_row(
        rows: list[np.ndarray],
        budget: Budget,
        images: Sequence[tuple[int | None, int | None]],
        image_token_id: int,
    ) -> list[Built] | None:
        """Images dealt to samples in order, by each sample's placeholder count."""
        budgets = [budget] * len(images) if isinstance(budget, int) else list(budget)
        if len(budgets) != len(images) or any(t is None for _, t in images):
            return None
        out: list[Built] = []
        start = 0
        for row in rows:
            want, stop = int((row == image_token_id).sum()), start
            got = 0
            while got < want and stop < len(images):
                got += int(images[stop][1] or 0)
                stop += 1
            if got != want:
                return None
            mine = budgets[start:stop]
            units = [u for u, _ in images[start:stop]]
            row_budget: Budget = budget if isinstance(budget, int) else tuple(mine)
            out.append((row_budget, None if None in units else tuple(int(u or 0) for u in units)))
            start = stop
        return out if start == len(images) else None

    def lookup(
        self, input_ids: Any, attention_mask: Any, vision_ids: Sequence[int]
    ) -> Built | None:
        """(budget, units per image) of a batch whose every sample with images or videos
        was recorded."""
        keys = [
            k
            for k in (self.key(row, vision_ids) for row in _rows(input_ids, attention_mask))
            if k is not None
        ]
        with self._lock:
            found = [self._budgets.get(k) for k in keys]
        if not found or any(entry is None for entry in found):
            return None
        entries = [e for e in found if e is not None]
        ints = {e[0] for e in entries if isinstance(e[0], int)}
        if len(ints) == 1 and all(isinstance(e[0], int) for e in entries):
            budget: Budget = ints.pop()  # one budget for every image
        else:
            per_image: list[int] = []
            for row_budget, units in entries:
                if isinstance(row_budget, int):
                    if units is None:
                        return None  # an int row mixed with lists: its image count is unknown
                    per_image += [row_budget] * len(units)
                else:
                    per_image += list(row_budget)
            budget = tuple(per_image)
        unit_lists = [e[1] for e in entries]
        units = (
            None
            if any(u is None for u in unit_lists)
            else tuple(
                u
                for lst in unit_lists
                for u in lst  # type: ignore[union-attr]
            )
        )
        return budget, units

    def __deepcopy__(self, memo: dict[int, Any]) -> InputsLedger:
        new = InputsLedger()
        with self._lock:
            new._budgets = collections.OrderedDict(self._budgets)
        return new


def _vision_token_ids(source: Any) -> list[int]:
    """The image placeholder id, then the video one (a processor or a model config)."""
    ids = [getattr(source, name, None) for name in ("image_token_id", "video_token_id")]
    return [i for i in ids if isinstance(i, int)]


def _processor_vision_ids(processor: Any, state: PatchState) -> list[int]:
    """The id of the token the model replaces per image feature, then the video one."""
    image = processor.tokenizer.convert_tokens_to_ids(state.adapter.placeholder_token(processor))
    video = getattr(processor, "video_token_id", None)
    return [i for i in (image, video) if isinstance(i, int)]


#: keyword arguments that carry images or videos into forward / generate
_VISION_INPUTS = ("pixel_values", "pixel_values_videos")


def run_with_input_budget(self: Model, name: str, args: tuple, kwargs: dict) -> Any:
    """Call stock ``name`` with what the patched processor recorded for these inputs: their
    units per image, and their budget when no ``flexproj.tokens`` block is in force."""
    stock = stock_method(self, name)
    state = state_of(self)
    if state is None or not state.enabled or torch.compiler.is_compiling():
        return stock(*args, **kwargs)  # (a traced call reads no ledger: hashing ids breaks graphs)
    if not any(kwargs.get(key) is not None for key in _VISION_INPUTS):
        return stock(*args, **kwargs)
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args[0]
    mask = kwargs.get("attention_mask")
    vision_ids = _vision_token_ids(self.config)
    built = None if input_ids is None else state.built_inputs.lookup(input_ids, mask, vision_ids)
    if built is None:
        return stock(*args, **kwargs)
    budget, units = built
    with contextlib.ExitStack() as scope:
        if current_tokens() is None:  # an explicit block wins (and mismatches raise)
            scope.enter_context(tokens(budget))
        scope.enter_context(call_units(units))
        return stock(*args, **kwargs)


def _forward_with_input_budget(self: Model, *args: Any, **kwargs: Any) -> Any:
    return run_with_input_budget(self, "forward", args, kwargs)


def _generate_with_input_budget(self: Model, *args: Any, **kwargs: Any) -> Any:
    return run_with_input_budget(self, "generate", args, kwargs)


def _record_built_inputs(self: Any, text: Any, text_inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """Processor hook after tokenisation: note which budget built these ``input_ids``."""
    result = stock_method(self, "_check_special_mm_tokens")(text, text_inputs, *args, **kwargs)
    state = state_of(self)
    noted = _NOTED.get()
    _NOTED.set(None)
    if state is not None and state.enabled:
        state.built_inputs.record(
            text_inputs["input_ids"],
            text_inputs.get("attention_mask"),
            state.budget(),
            noted,
            _processor_vision_ids(self, state),
        )
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
        token = state.adapter.placeholder_token(self)
        patched = self.replace_image_token(inputs, 0).count(token)
        with disabled_state(state):
            stock = self.replace_image_token(inputs, 0).count(token)
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
    #: how ``projector="stock"`` may pool (``flexproj.patch(..., stock_pooling=)``): "after"
    #: the stock projector (every family); "first" where the stock projector pools itself
    stock_poolings: ClassVar[tuple[str, ...]] = ("after",)
    #: the processor wants a batch's images as one list per sample (Gemma 3 counts each
    #: sample's images against its prompt); the others take a flat list too
    nested_images: ClassVar[bool] = False

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

    def processor_images(self, per_sample: Sequence[Sequence[Any]]) -> list[Any] | None:
        """A batch's images (one sequence per sample) as the processor takes them: one
        list per sample where it wants that (:attr:`nested_images`), else flat; None
        without any."""
        if not any(per_sample):
            return None
        if self.nested_images:
            return [list(images) for images in per_sample]
        return [im for images in per_sample for im in images]

    def placeholder_token(self, processor: Any) -> str:
        """The token the processor repeats per vision token (what the model replaces)."""
        return str(processor.image_token)

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
        if hasattr(model, "generate"):
            patcher.override_method(model, "generate", _generate_with_input_budget)
        if hasattr(model, "save_pretrained"):
            from flexproj.checkpoint import save_patched_model  # (checkpoint imports patching)

            patcher.override_method(model, "save_pretrained", save_patched_model)

    def install_processor_common(self, processor: Any, state: PatchState, patcher: Patcher) -> None:
        patcher.set(processor, STATE_ATTR, state)
        patcher.override_method(processor, "_check_special_mm_tokens", _record_built_inputs)
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
