"""``flexproj.patch`` / ``flexproj.unpatch`` and the public accessors of a patched model.

Everything a patch changes is recorded by a :class:`~flexproj.patcher.Patcher` and undone
in reverse order, on ``unpatch`` or when any step of ``patch`` fails, so a failed patch
leaves the model exactly as it was and ``unpatch`` gives back the original projector
object (bit-identical logits). Transformers' classes are never touched.

While patched, the stock projector stays in the module tree (inside the slot module, as
``stock``, frozen), so ``.to(dtype)`` / ``.to(device)`` move it too and
:func:`disabled` can run the stock path for a block without unpatching.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from flexproj._types import Model
from flexproj.checkpoint import save_patched_model
from flexproj.errors import PatchError
from flexproj.family import model_device_dtype
from flexproj.patcher import Patcher
from flexproj.registry import adapter_for
from flexproj.state import NATIVE_RULES, PatchState, check_native_rule, disabled_state, state_of

DEFAULT_TOKENS = 144

__all__ = [
    "DEFAULT_TOKENS",
    "NATIVE_RULES",
    "PatchInfo",
    "disabled",
    "get_projector",
    "is_patched",
    "patch",
    "patch_info",
    "patch_processor",
    "set_native",
    "unpatch",
    "unpatch_processor",
]


@dataclass(frozen=True)
class PatchInfo:
    """What :func:`patch` installed (a read-only summary)."""

    model_type: str
    #: "flex" (FlexProjector) or "stock" (stock projector, outputs pooled)
    mode: str
    default_tokens: int
    #: stock vision tokens per unit, or None where each image keeps its own (Qwen)
    native_tokens: int | None
    unit: str
    schedule: dict[str, Any] | None
    #: mode "stock": "after" (stock projector outputs pooled) or "first" (tower grid pooled)
    stock_pooling: str = "after"
    #: the native-budget rule: "stock" (the stock projector runs at the native budget: the
    #: stock model there) or "projector" (the FlexProjector runs at every budget)
    native: str = "projector"


def _state(model: Model) -> PatchState:
    state = state_of(model)
    if state is None:
        raise PatchError(f"{type(model).__name__} is not patched by flexproj")
    return state


def is_patched(model: Model) -> bool:
    return state_of(model) is not None


def get_projector(model: Model) -> nn.Module:
    """The installed projector: the FlexProjector (or, with ``projector="stock"``, the
    stock projector whose outputs are pooled). Train, inspect or copy it freely."""
    return _state(model).projector


def patch_info(model: Model) -> PatchInfo:
    state = _state(model)
    return PatchInfo(
        model_type=model.config.model_type,
        mode=state.mode,
        default_tokens=state.default_budget,
        native_tokens=state.native_tokens,
        unit=state.adapter.unit,
        schedule=state.schedule,
        stock_pooling=state.stock_pooling,
        native=state.native,
    )


def set_native(model: Model, native: str) -> Model:
    """Set the native-budget rule of patched ``model`` (see :func:`patch`); returns it.

    E.g. a distiller fits the FlexProjector at the native budget too (``"projector"``)
    and then hands over a model whose native budget runs the stock projector (``"stock"``).
    """
    state = _state(model)
    check_native_rule(native)
    if state.mode == "flex":
        state.native = native
    return model


@contextlib.contextmanager
def disabled(model: Model) -> Iterator[Model]:
    """Run the stock model inside the block, in this thread / task only.

    The stock projector and stock placeholder counts (model and processors patched with
    it) are in force for code running in this context; other threads keep the patched
    path. Logits equal the unpatched model's bit for bit. Nothing is unpatched.
    """
    with disabled_state(_state(model)):
        yield model


def _check_projector(model: Model, projector: Any, expected: tuple[int, int]) -> None:
    got = (getattr(projector, "in_dim", None), getattr(projector, "out_dim", None))
    if got != expected:
        raise PatchError(
            f"the given projector maps {got[0]} -> {got[1]} but this model needs "
            f"{expected[0]} -> {expected[1]}"
        )
    device, dtype = model_device_dtype(model)
    for p in projector.parameters():
        if p.dtype != dtype or p.device != device:
            raise PatchError(
                f"the given projector is {p.dtype} on {p.device} but the model is {dtype} on "
                f"{device}: move it first, projector.to(device={str(device)!r}, dtype={dtype})"
            )


def patch(
    model: Model,
    processor: Any = None,
    tokens: int | None = None,
    projector: Any = None,
    kernel: str = "auto",
    *,
    hidden_dim: int | None = None,
    stock_pooling: str = "after",
    native: str = "projector",
) -> nn.Module:
    """Swap ``model``'s projector for a FlexProjector, in place; returns ``model``.

    Args:
        model: a supported transformers VLM (``flexproj.supported_models()``).
        processor: its processor, patched to emit as many image placeholders as the
            model produces under the budget in force (or use :func:`patch_processor`).
        tokens: default budget outside ``flexproj.tokens`` blocks; ``None`` means 144,
            or the model's native count per image / tile when that is smaller.
        projector: a FlexProjector to install (e.g. a trained one; same device and dtype
            as the model); by default a new one of the right dims, on the model's device
            and dtype. ``"stock"``: no new weights, training-free: the stock projector
            stays and its *output* tokens are average-pooled to the budget on their grid
            (Matryoshka's pool-after layout).
        kernel: SwiGLU backend of a new projector.
        hidden_dim: hidden width of a new projector (default ``3 * in_dim``).
        stock_pooling: with ``projector="stock"``, ``"after"`` pools the stock projector's
            outputs (every family); ``"first"`` pools the tower grid and runs the stock
            projector's own layers on it, where the stock projector itself pools (Gemma 3:
            its RMSNorm + linear). The families' ``stock_poolings`` list what they allow.
        native: the native-budget rule. ``"stock"``: an image (crop, tile) whose budget is
            its stock token count runs the stock projector, so the model is the stock
            model bit for bit there (use it where the LLM was not trained with the
            FlexProjector: distilled or align-stage projectors); smaller budgets run the
            FlexProjector, image by image in a per-image list. ``"projector"`` (default):
            the FlexProjector runs at every budget (an LLM finetuned with it, the
            native budget in its schedule). Recorded by ``flexproj.save_pretrained``.

    Patching an already patched model raises :class:`~flexproj.errors.PatchError`:
    call :func:`unpatch` first (a second projector would silently drop the first).
    """
    adapter = adapter_for(model)
    if is_patched(model):
        raise PatchError(
            f"{type(model).__name__} is already patched by flexproj; call flexproj.unpatch(model) "
            "first, or flexproj.patch_processor(model, processor) to patch another processor"
        )
    if isinstance(projector, str) and projector != "stock":
        raise PatchError(f"projector must be a FlexProjector, None or 'stock', got {projector!r}")
    check_native_rule(native)
    mode = "stock" if projector == "stock" else "flex"
    if stock_pooling != "after" and (
        mode != "stock" or stock_pooling not in adapter.stock_poolings
    ):
        raise PatchError(
            f"stock_pooling={stock_pooling!r} needs projector='stock' and a family that offers "
            f"it; {type(adapter).__name__} offers {', '.join(map(repr, adapter.stock_poolings))}"
        )
    native_count = adapter.native_tokens(model, mode)
    if tokens is None:
        tokens = DEFAULT_TOKENS if native_count is None else min(DEFAULT_TOKENS, native_count)
    default = adapter.check_budget(tokens, native_count)
    if mode == "stock":
        projector = getattr(*adapter.projector_slot(model))
    elif projector is None:
        projector = adapter.build_projector(model, hidden_dim=hidden_dim, kernel=kernel)
    else:
        _check_projector(model, projector, adapter.projector_dims(model))
    state = PatchState(
        adapter=adapter,
        projector=projector,
        default_budget=default,
        native_tokens=native_count,
        mode=mode,
        stock_pooling=stock_pooling,
        native="stock" if mode == "stock" else native,
    )
    try:
        adapter.install_common(model, state)
        if hasattr(model, "save_pretrained"):
            state.model_patcher.override_method(model, "save_pretrained", save_patched_model)
        adapter.install(model, state)
        if processor is not None:
            patch_processor(model, processor)
    except BaseException:
        state.model_patcher.undo()
        raise
    return model


def patch_processor(model: Model, processor: Any) -> Any:
    """Make ``processor`` emit placeholders for patched ``model``'s budget; returns it.

    A processor patched for another model is unpatched from it first.
    """
    state = _state(model)
    if state_of(processor) is not None:
        unpatch_processor(processor)
    patcher = Patcher()
    try:
        state.adapter.install_processor_common(processor, state, patcher)
        state.adapter.patch_processor(processor, state, patcher)
    except BaseException:
        patcher.undo()
        raise
    state.processor_patchers.append((processor, patcher))
    return processor


def unpatch_processor(processor: Any) -> Any:
    """Give ``processor`` its stock placeholder counting back."""
    state = state_of(processor)
    if state is None:
        return processor
    for i, (proc, patcher) in enumerate(state.processor_patchers):
        if proc is processor:
            patcher.undo()
            del state.processor_patchers[i]
            break
    return processor


def unpatch(model: Model) -> nn.Module:
    """Undo :func:`patch`: the original projector object and methods come back."""
    state = _state(model)
    while state.processor_patchers:
        _, patcher = state.processor_patchers.pop()
        patcher.undo()
    state.model_patcher.undo()
    return model
