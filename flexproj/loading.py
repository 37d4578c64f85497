"""``flexproj.from_pretrained``: a saved projector onto a model, patching it if needed.

Apart from :mod:`flexproj.checkpoint` (which writes and reads the files) because it
patches: the patch installs checkpoint's ``save_pretrained``, so checkpoint cannot
import the patch without a cycle.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from flexproj._types import Model
from flexproj.checkpoint import read_checkpoint
from flexproj.errors import CheckpointError, PatchError
from flexproj.family import model_device_dtype
from flexproj.patching import patch, patch_processor
from flexproj.projector import FlexProjector
from flexproj.registry import adapter_for
from flexproj.state import check_native_rule, state_of

__all__ = ["from_pretrained"]


def from_pretrained(
    model: Model,
    path: str | os.PathLike[str],
    processor: Any = None,
    *,
    tokens: int | None = None,
    kernel: str = "auto",
    native: str | None = None,
) -> nn.Module:
    """Load a saved projector onto ``model`` (unpatched or patched); returns ``model``.

    An unpatched model is patched with it (default budget from the checkpoint unless
    ``tokens`` is given); a patched one gets its projector replaced, keeping its
    default budget (unless ``tokens`` is given) and patched processors. Everything is
    checked before anything changes: a load that fails leaves the model, its projector
    and its processors as they were. ``native``: the native-budget rule
    (``flexproj.patch``); by default the checkpoint's ("projector" for older ones).
    """
    config, tensors = read_checkpoint(path)
    rule = check_native_rule(native or config.get("native", "projector"))
    adapter = adapter_for(model)
    model_type = model.config.model_type
    if config["model_type"] != model_type:
        raise CheckpointError(
            f"the checkpoint at {path} is for model_type {config['model_type']!r}, "
            f"this model is {model_type!r}"
        )
    in_dim, out_dim = adapter.projector_dims(model)
    saved = config["projector"]
    if (saved["in_dim"], saved["out_dim"]) != (in_dim, out_dim):
        raise CheckpointError(
            f"the checkpoint's projector maps {saved['in_dim']} -> {saved['out_dim']} but this "
            f"model needs {in_dim} -> {out_dim}: it was trained for another model size"
        )
    projector = FlexProjector(kernel=kernel, **saved)
    try:
        projector.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the checkpoint at {path} does not fit its own config: {exc}"
        ) from None
    device, dtype = model_device_dtype(model)
    projector.to(device=device, dtype=dtype)

    native_count = adapter.native_tokens(model)
    state = state_of(model)
    if state is None:
        if tokens is None:
            saved_default = config["default_tokens"]
            tokens = saved_default if native_count is None else min(saved_default, native_count)
        patch(model, processor, tokens=tokens, projector=projector, native=rule)
        patched_state = state_of(model)
        assert patched_state is not None
        patched_state.schedule = config.get("token_schedule")
        return model
    if state.mode != "flex":
        raise PatchError(
            "this model is patched with projector='stock'; flexproj.unpatch(model) first to "
            "load a FlexProjector"
        )
    # patched: validate, then swap the projector in place (processors stay patched)
    default = adapter.check_budget(state.default_budget if tokens is None else tokens, native_count)
    if processor is not None:
        adapter.check_processor(processor)
    slot = getattr(*adapter.projector_slot(model))
    slot.projector = projector
    state.projector = projector
    state.default_budget = default
    state.schedule = config.get("token_schedule")
    state.native = rule
    if processor is not None and state_of(processor) is not state:
        patch_processor(model, processor)
    return model
