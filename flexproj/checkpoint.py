"""Save and load a patched model's projector (weights and config only).

One ``flexproj.safetensors`` file holds the weights and, in its metadata, the config
that loading trusts; ``flexproj_config.json`` is the same config for people. Each is
written to a temporary file beside it and moved into place with ``os.replace``, so a
save that fails leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flexproj._types import Model
from flexproj._version import __version__
from flexproj.errors import CheckpointError, PatchError
from flexproj.family import model_device_dtype
from flexproj.patching import patch, patch_processor
from flexproj.projector import FlexProjector
from flexproj.registry import adapter_for
from flexproj.state import PatchState, state_of

WEIGHTS_NAME = "flexproj.safetensors"
CONFIG_NAME = "flexproj_config.json"
FORMAT_VERSION = 1
POOLING = "adaptive_avg_pool2d"


def _atomic_write(target: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def _patched_state(model: Model) -> PatchState:
    state = state_of(model)
    if state is None:
        raise PatchError("save_pretrained needs a patched model: call flexproj.patch(model) first")
    if state.mode != "flex":
        raise PatchError(
            f"this model runs its stock projector (projector={state.mode!r}): there is no "
            "FlexProjector to save; the stock weights are the model's own"
        )
    return state


def checkpoint_config(model: Model, schedule: dict[str, Any] | None = None) -> dict[str, Any]:
    state = _patched_state(model)
    return {
        "format": FORMAT_VERSION,
        "flexproj_version": __version__,
        "model_type": model.config.model_type,
        "adapter": type(state.adapter).__name__,
        "projector": cast(FlexProjector, state.projector).config(),
        "pooling": POOLING,
        "default_tokens": state.default_budget,
        # stock tokens per unit; null where each image keeps its own count (Qwen)
        "native_tokens": state.native_tokens,
        "token_schedule": schedule if schedule is not None else state.schedule,
    }


def save_pretrained(
    model: Model,
    path: str | os.PathLike[str],
    *,
    schedule: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the projector of patched ``model`` to directory ``path``; returns it.

    ``state_dict``: the projector's weights to write instead of the live module's (e.g.
    gathered from FSDP shards); it must have exactly the projector's keys and shapes.
    """
    config = checkpoint_config(model, schedule)
    live = _patched_state(model).projector.state_dict()
    if state_dict is not None:
        shapes = {k: tuple(v.shape) for k, v in live.items()}
        given = {k: tuple(v.shape) for k, v in state_dict.items()}
        if shapes != given:
            raise CheckpointError(
                f"state_dict does not match the projector: expected {shapes}, got {given}"
            )
        live = state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in live.items()}
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(
        directory / WEIGHTS_NAME,
        lambda tmp: save_file(tensors, tmp, metadata={"flexproj_config": text}),
    )
    _atomic_write(directory / CONFIG_NAME, lambda tmp: _write_text(tmp, text + "\n"))
    return directory


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a flexproj checkpoint directory, or :class:`CheckpointError`."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise CheckpointError(
            f"no flexproj checkpoint at {path}: {WEIGHTS_NAME} is missing "
            "(write one with flexproj.save_pretrained(model, path))"
        )
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:
        raise CheckpointError(
            f"{file} is damaged or not a safetensors file ({exc}); save the projector again"
        ) from None
    if "flexproj_config" not in metadata:
        raise CheckpointError(
            f"{file} has no flexproj config in its metadata; was it written by flexproj?"
        )
    config = json.loads(metadata["flexproj_config"])
    if config.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format {config.get('format')!r}; this flexproj reads {FORMAT_VERSION}"
        )
    return config, tensors


def from_pretrained(
    model: Model,
    path: str | os.PathLike[str],
    processor: Any = None,
    *,
    tokens: int | None = None,
    kernel: str = "auto",
) -> nn.Module:
    """Load a saved projector onto ``model`` (unpatched or patched); returns ``model``.

    An unpatched model is patched with it (default budget from the checkpoint unless
    ``tokens`` is given); a patched one gets its projector replaced, keeping its
    default budget (unless ``tokens`` is given) and patched processors. Everything is
    checked before anything changes: a load that fails leaves the model, its projector
    and its processors as they were.
    """
    config, tensors = read_checkpoint(path)
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

    native = adapter.native_tokens(model)
    state = state_of(model)
    if state is None:
        if tokens is None:
            saved_default = config["default_tokens"]
            tokens = saved_default if native is None else min(saved_default, native)
        patch(model, processor, tokens=tokens, projector=projector)
        _patched_state(model).schedule = config.get("token_schedule")
        return model
    if state.mode != "flex":
        raise PatchError(
            "this model is patched with projector='stock'; flexproj.unpatch(model) first to "
            "load a FlexProjector"
        )
    # patched: validate, then swap the projector in place (processors stay patched)
    default = adapter.check_budget(state.default_budget if tokens is None else tokens, native)
    if processor is not None:
        adapter.check_processor(processor)
    slot = getattr(*adapter.projector_slot(model))
    slot.projector = projector
    state.projector = projector
    state.default_budget = default
    state.schedule = config.get("token_schedule")
    if processor is not None and state_of(processor) is not state:
        patch_processor(model, processor)
    return model


def stock_state_dict(model: Model, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` of patched ``model`` with the stock projector's keys where the stock
    model has them and the flexproj modules left out: what the stock class loads."""
    state = state_of(model)
    if state is None:
        return state_dict
    slot = getattr(*state.adapter.projector_slot(model))
    prefix = next(name for name, module in model.named_modules() if module is slot) + "."
    stock = prefix + "stock."
    out = {}
    for key, value in state_dict.items():
        if key.startswith(stock):
            out[prefix + key[len(stock) :]] = value
        elif not key.startswith(prefix):
            out[key] = value
    return out


def save_patched_model(self: Model, *args: Any, **kwargs: Any) -> Any:
    """Patched ``save_pretrained``: the stock model (stock projector included) that the
    stock class reloads exactly, plus this model's flexproj projector files beside it,
    which ``flexproj.from_pretrained(model, same_dir)`` loads."""
    import inspect

    from flexproj.patcher import stock_method

    stock = stock_method(self, "save_pretrained")
    bound = inspect.signature(stock).bind(*args, **kwargs)
    given = bound.arguments.get("state_dict")
    bound.arguments["state_dict"] = stock_state_dict(
        self, self.state_dict() if given is None else given
    )
    result = stock(*bound.args, **bound.kwargs)
    state = state_of(self)
    if state is not None and state.mode == "flex" and bound.arguments.get("is_main_process", True):
        save_pretrained(self, bound.arguments["save_directory"])
    return result
