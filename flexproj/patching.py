"""``flexproj.patch`` / ``flexproj.unpatch``: instance patching, all-or-nothing.

Everything a patch changes is recorded by a :class:`~flexproj.adapters.base.Patcher`
and undone in reverse order, on ``unpatch`` or when any step of ``patch`` fails, so
a failed patch leaves the model exactly as it was and ``unpatch`` gives back the
original projector object (bit-identical logits). Transformers' classes are never
touched.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flexproj._types import Model
from flexproj.errors import PatchError

STATE_ATTR = "flexproj_state"
DEFAULT_TOKENS = 144


def get_state(model: Model) -> Any:
    """The :class:`~flexproj.adapters.base.PatchState` of a patched model, else ``None``."""
    return getattr(model, STATE_ATTR, None)


def is_patched(model: Model) -> bool:
    return get_state(model) is not None


def patch(
    model: Model,
    processor: Any = None,
    tokens: int | None = None,
    projector: Any = None,
    kernel: str = "auto",
    *,
    hidden_dim: int | None = None,
) -> nn.Module:
    """Swap ``model``'s projector for a FlexProjector, in place; returns ``model``.

    Args:
        model: a supported transformers VLM (``flexproj.supported_models()``).
        processor: its processor, patched to emit as many image placeholders as the
            model produces under the budget in force (or use :func:`patch_processor`).
        tokens: default budget outside ``flexproj.tokens`` blocks; ``None`` means 144,
            or the model's native count per image / tile when that is smaller.
        projector: a FlexProjector to install (e.g. a trained one); by default a new
            one of the right dims, on the model's device and dtype.
        kernel: SwiGLU backend of a new projector.
        hidden_dim: hidden width of a new projector (default ``3 * in_dim``).

    Patching an already patched model raises :class:`~flexproj.errors.PatchError`:
    call :func:`unpatch` first (a second projector would silently drop the first).
    """
    from flexproj.adapters import PatchState, adapter_for

    adapter = adapter_for(model)
    if is_patched(model):
        raise PatchError(
            f"{type(model).__name__} is already patched by flexproj; call flexproj.unpatch(model) "
            "first, or flexproj.patch_processor(model, processor) to patch another processor"
        )
    native = adapter.native_tokens(model)
    default = adapter.check_budget(
        min(DEFAULT_TOKENS, native) if tokens is None else tokens, native
    )
    if projector is None:
        projector = adapter.build_projector(model, hidden_dim=hidden_dim, kernel=kernel)
    else:
        expected = adapter.projector_dims(model)
        got = (getattr(projector, "in_dim", None), getattr(projector, "out_dim", None))
        if got != expected:
            raise PatchError(
                f"the given projector maps {got[0]} -> {got[1]} but this model needs "
                f"{expected[0]} -> {expected[1]}"
            )
    state = PatchState(adapter=adapter, projector=projector, default_tokens=default, kernel=kernel)
    try:
        adapter.install(model, state)
        state.model_patcher.set(model, STATE_ATTR, state)
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
    from flexproj.adapters import Patcher

    state = get_state(model)
    if state is None:
        raise PatchError("patch the model first: flexproj.patch(model, processor)")
    previous = getattr(processor, STATE_ATTR, None)
    if previous is not None:
        unpatch_processor(processor)
    patcher = Patcher()
    try:
        state.adapter.patch_processor(processor, state, patcher)
        patcher.set(processor, STATE_ATTR, state)
    except BaseException:
        patcher.undo()
        raise
    state.processor_patchers.append((processor, patcher))
    return processor


def unpatch_processor(processor: Any) -> Any:
    """Give ``processor`` its stock placeholder counting back."""
    state = getattr(processor, STATE_ATTR, None)
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
    state = get_state(model)
    if state is None:
        raise PatchError(f"{type(model).__name__} is not patched by flexproj")
    while state.processor_patchers:
        _, patcher = state.processor_patchers.pop()
        patcher.undo()
    state.model_patcher.undo()
    return model
