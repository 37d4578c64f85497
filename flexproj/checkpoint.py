"""Save and load a patched model's projector (weights and config only).

One ``flexproj.safetensors`` file holds the weights and, in its metadata, the config
that loading trusts; ``flexproj_config.json`` is the same config for people, derived
from it and never read back. Both are written to temporary files beside them (with the
mode a plain write gets) and moved into place with ``os.replace``, so a save that fails
while writing leaves the previous checkpoint whole. The old JSON is removed before the
moves: a save that fails between them leaves the new weights without a JSON (save
again to restore it), never beside a JSON that describes other weights.

Loading type-checks every config field (the error names the one that is wrong), checks
the metadata's sha256 over the config text and the tensors (:func:`content_hash`), and
refuses non-finite weights; each problem is a :class:`CheckpointError`. A checkpoint
without a hash (written before it existed) loads with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexproj._types import Model
from flexproj._version import __version__
from flexproj.errors import CheckpointError, PatchError
from flexproj.projector import FlexProjector
from flexproj.schedule import TokenSchedule
from flexproj.state import NATIVE_RULES, PatchState, check_native_rule, state_of

WEIGHTS_NAME = "flexproj.safetensors"
CONFIG_NAME = "flexproj_config.json"
FORMAT_VERSION = 1
POOLING = "adaptive_avg_pool2d"
CONFIG_KEY = "flexproj_config"  # safetensors metadata: the config as JSON text
HASH_KEY = "flexproj_sha256"  # safetensors metadata: content_hash(config text, tensors)


def _create_temp(target: Path) -> str:
    """A new empty file beside ``target``, created as ``open(..., "w")`` would create it:
    mode 0o666 less the umask (``tempfile.mkstemp`` makes 0o600, which other accounts
    cannot read once it is moved into place)."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # a name another writer holds; draw again
            continue
        os.close(fd)
        return str(tmp)


def _write_temp(target: Path, write: Callable[[str], None]) -> str:
    """Write a complete, synced temporary file beside ``target``; returns its path."""
    tmp = _create_temp(target)
    try:
        mode = os.stat(tmp).st_mode
        write(tmp)
        os.chmod(tmp, mode)  # safetensors' writer recreates the file as 0o600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_atomically(target: Path, write: Callable[[str], None]) -> None:
    """``write(path)`` a complete file at ``target``: written beside it with the mode a plain
    write gets (0o666 less the umask, whatever the writer does), synced, moved into place."""
    tmp = _write_temp(target, write)
    try:
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


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


def checkpoint_config(
    model: Model, schedule: dict[str, Any] | None = None, native: str | None = None
) -> dict[str, Any]:
    state = _patched_state(model)
    if native is not None:
        check_native_rule(native)
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
        # the native-budget rule (flexproj.patch(..., native=)); absent in older checkpoints
        "native": native or state.native,
    }


def save_pretrained(
    model: Model,
    path: str | os.PathLike[str],
    *,
    schedule: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    native: str | None = None,
) -> Path:
    """Write the projector of patched ``model`` to directory ``path``; returns it.

    ``native``: the native-budget rule to record (default: the model's; e.g. a recipe that
    trains the FlexProjector at the native budget and hands over ``"stock"``).

    ``state_dict``: the projector's weights to write instead of the live module's (e.g.
    gathered from FSDP shards); it must have exactly the projector's keys and shapes.
    """
    config = checkpoint_config(model, schedule, native)
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
    for name, tensor in tensors.items():  # before anything is written: keep the last good save
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"the projector's {name!r} holds NaN or infinite values (training diverged); "
                f"nothing was written, {path} keeps what it had"
            )
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True)
    weights, derived = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    weights_tmp = _write_temp(
        weights,
        lambda tmp: save_file(
            tensors, tmp, metadata={CONFIG_KEY: text, HASH_KEY: content_hash(text, tensors)}
        ),
    )
    try:
        derived_tmp = _write_temp(derived, lambda tmp: _write_text(tmp, text + "\n"))
        try:
            # The JSON is derived from the weights' metadata (loading never reads it). It
            # goes first, so a failure between the two moves leaves the weights without
            # a JSON, never beside the JSON of another save.
            derived.unlink(missing_ok=True)
            os.replace(weights_tmp, weights)
            os.replace(derived_tmp, derived)
        finally:
            Path(derived_tmp).unlink(missing_ok=True)
    finally:
        Path(weights_tmp).unlink(missing_ok=True)
    return directory


def content_hash(config_text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the config text, then each tensor (by name) as name, dtype, shape, bytes."""
    digest = hashlib.sha256()

    def field(data: bytes) -> None:  # length-prefixed, so no two inputs share a stream
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    field(config_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        field(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        field(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_float(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_positive_int(v) for v in value)


def _weight_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in value
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Every field of a stored config: (check, what it must be). The projector's fields are
# FlexProjector's constructor arguments, the schedule's TokenSchedule's.
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "flexproj_version": (_is_str, "a string"),
    "model_type": (_is_str, "a string"),
    "adapter": (_is_str, "a string"),
    "pooling": (lambda v: v == POOLING, f"{POOLING!r}"),
    "default_tokens": (_positive_int, "a positive int"),
    # null where each image keeps its own count (Qwen)
    "native_tokens": (lambda v: v is None or _positive_int(v), "a positive int or null"),
}
_PROJECTOR_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "in_dim": (_positive_int, "a positive int"),
    "out_dim": (_positive_int, "a positive int"),
    "hidden_dim": (_positive_int, "a positive int"),
    "bias": (_is_bool, "true or false"),
    "eps": (_positive_float, "a positive finite number"),
}
_SCHEDULE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tokens": (_int_list, "a list of positive ints"),
    "weights": (_weight_list, "a list of non-negative numbers"),
    "seed": (_is_int, "an int"),
    "per_sample": (_is_bool, "true or false"),
}


def _check_fields(
    file: Path,
    section: Any,
    fields: Mapping[str, tuple[Callable[[Any], bool], str]],
    prefix: str,
    *,
    exact: bool,
) -> None:
    if not isinstance(section, dict):
        raise CheckpointError(
            f"{file}: config field {prefix.rstrip('.') or '(top level)'} must be a JSON "
            f"object, got {section!r:.80}"
        )
    for name, (check, expected) in fields.items():
        if name not in section:
            raise CheckpointError(f"{file}: config field {prefix}{name} is missing")
        if not check(section[name]):
            raise CheckpointError(
                f"{file}: config field {prefix}{name} must be {expected}, got {section[name]!r:.80}"
            )
    unknown = sorted(set(section) - set(fields)) if exact else []
    if unknown:
        raise CheckpointError(f"{file}: config field {prefix.rstrip('.')} has unknown {unknown}")


def _parse_config(file: Path, text: str) -> dict[str, Any]:
    """The stored config, every field type-checked; :class:`CheckpointError` names the
    first field that is wrong."""
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{file}: its flexproj config is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: its flexproj config is not a JSON object")
    fmt = config.get("format")
    if not _is_int(fmt) or fmt != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format {fmt!r:.80}; this flexproj reads {FORMAT_VERSION}"
        )
    _check_fields(file, config, _FIELDS, "", exact=False)
    _check_fields(file, config.get("projector"), _PROJECTOR_FIELDS, "projector.", exact=True)
    if config.get("native", "projector") not in NATIVE_RULES:
        raise CheckpointError(
            f"{file}: config field native must be one of {NATIVE_RULES}, got "
            f"{config['native']!r:.80}"
        )
    schedule = config.get("token_schedule")
    if schedule is not None:
        _check_fields(file, schedule, _SCHEDULE_FIELDS, "token_schedule.", exact=True)
        try:
            TokenSchedule(**schedule)
        except ValueError as exc:
            raise CheckpointError(f"{file}: config field token_schedule: {exc}") from None
    return config


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
    if CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"{file} has no flexproj config in its metadata; was it written by flexproj?"
        )
    text = metadata[CONFIG_KEY]
    config = _parse_config(file, text)
    stored_hash = metadata.get(HASH_KEY)
    if stored_hash is None:
        warnings.warn(
            f"{file} has no content hash (it predates flexproj's checkpoint hashing), so "
            "changes to it cannot be detected; save it again to add one",
            UserWarning,
            stacklevel=3,
        )
    elif stored_hash != content_hash(text, tensors):
        raise CheckpointError(
            f"{file} does not match the content hash stored in it: its weights or config "
            "were changed or damaged after saving; save the projector again"
        )
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {tensor.dtype}, not float")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{file}: tensor {name!r} holds NaN or infinite values; the projector it was "
                "saved from had diverged"
            )
    return config, tensors


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
