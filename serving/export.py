"""``flexproj export BASE PROJECTOR OUT``: one model directory for vLLM and transformers.

OUT is a copy of the base model directory (weights, config, tokenizer, processor) plus
the flexproj checkpoint (``flexproj.safetensors``, ``flexproj_config.json``), with two
changes to ``config.json``:

* ``architectures`` names the flexproj vLLM class (``vllm serve OUT`` with the plug-in
  installed builds it; transformers ignores the field when a class is given);
* a ``flexproj`` block holds the checkpoint config (projector shape, default budget),
  which the vLLM processor and model read.

The base weights are copied unchanged (the stock projector included), so
``LlavaForConditionalGeneration.from_pretrained(OUT)`` loads without missing keys and
``flexproj.from_pretrained(model, OUT, processor)`` then installs the projector.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flexproj.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_checkpoint
from flexproj.errors import CheckpointError
from flexproj.registry import get_adapter
from flexproj.serving.budget import CONFIG_KEY
from flexproj.serving.vllm_plugin import MODEL_TYPES

__all__ = ["export"]


def _check_native(base_dir: Path, model_type: str, tokens: int) -> None:
    """A default budget above the model's native count is refused (families that cap per
    image, Qwen, accept any), as ``flexproj.patch`` refuses it: read from the config alone."""
    from transformers import AutoConfig

    adapter = get_adapter(model_type)
    native = adapter.native_tokens(SimpleNamespace(config=AutoConfig.from_pretrained(base_dir)))
    adapter.check_budget(tokens, native)


def export(
    base: str | os.PathLike[str],
    projector: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tokens: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the served directory ``out``; ``tokens`` overrides the default budget."""
    base_dir, out_dir = Path(base), Path(out)
    flex, _ = read_checkpoint(projector)
    config_file = base_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{base_dir} is not a model directory: config.json is missing")
    config: dict[str, Any] = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type != flex["model_type"]:
        raise CheckpointError(
            f"the projector at {projector} is for model_type {flex['model_type']!r}, the base "
            f"model at {base_dir} is {model_type!r}"
        )
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"flexproj serves {', '.join(sorted(MODEL_TYPES))} with vLLM; not {model_type!r}"
        )
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise ValueError(f"--tokens must be a positive int, got {tokens!r}")
        _check_native(base_dir, model_type, tokens)
        flex = {**flex, "default_tokens": tokens}
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite)")
        shutil.rmtree(out_dir)
    shutil.copytree(base_dir, out_dir, ignore=shutil.ignore_patterns(WEIGHTS_NAME, CONFIG_NAME))
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copy2(Path(projector) / name, out_dir / name)
    config["architectures"] = [MODEL_TYPES[model_type]]
    config[CONFIG_KEY] = flex
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
