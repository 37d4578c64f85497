"""``flexproj export BASE PROJECTOR OUT``: one model directory for vLLM and transformers.

OUT is a copy of the base model directory (weights, config, tokenizer, processor) plus
the flexproj checkpoint (``flexproj.safetensors``, ``flexproj_config.json``), with two
changes to ``config.json``:

* ``architectures`` names the flexproj vLLM class (``vllm serve OUT`` with the plug-in
  installed builds it; transformers ignores the field when a class is given);
* a ``flexproj`` block holds the checkpoint config (projector shape, default budget),
  which the vLLM processor and model read.

and, for a Qwen or OneVision base saved with an image-only processor, a
``video_processor`` entry in ``processor_config.json`` (vLLM loads those processors with
their video processor and refuses to start without one).

The base weights are copied unchanged (the stock projector included), so
``LlavaForConditionalGeneration.from_pretrained(OUT)`` loads without missing keys and
``flexproj.from_pretrained(model, OUT, processor)`` then installs the projector.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flexproj.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_checkpoint
from flexproj.errors import CheckpointError
from flexproj.registry import get_adapter
from flexproj.serving.budget import CONFIG_KEY
from flexproj.serving.families import FAMILIES

__all__ = ["export", "serve_command"]

PROCESSOR_CONFIG = "processor_config.json"
#: image-processor fields a video processor shares (the rest keep its defaults)
_VIDEO_FIELDS = (
    "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std",
    "do_convert_rgb", "do_normalize", "do_rescale", "rescale_factor", "resample",
)  # fmt: skip
#: vLLM's CPU attention backend rejects smaller heads (first request: HTTP 500)
CPU_MIN_HEAD_DIM = 32
#: on CPU, vLLM's --gpu-memory-utilization is the share of the machine's RAM it takes
CPU_MEMORY_UTILIZATION = 0.2


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
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise CheckpointError(
            f"flexproj serves {', '.join(sorted(FAMILIES))} with vLLM; not {model_type!r}"
        )
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise ValueError(f"--tokens must be a positive int, got {tokens!r}")
        _check_native(base_dir, str(model_type), tokens)
        flex = {**flex, "default_tokens": tokens}
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite)")
        shutil.rmtree(out_dir)
    shutil.copytree(base_dir, out_dir, ignore=shutil.ignore_patterns(WEIGHTS_NAME, CONFIG_NAME))
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copy2(Path(projector) / name, out_dir / name)
    if family.video_processor is not None:
        _add_video_processor(out_dir / PROCESSOR_CONFIG, family.video_processor)
    config["architectures"] = [family.architecture]
    config[CONFIG_KEY] = flex
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _add_video_processor(path: Path, video_type: str) -> None:
    """Give an image-only ``processor_config.json`` the video processor vLLM loads."""
    if not path.is_file() or (path.parent / "video_preprocessor_config.json").is_file():
        return
    processor: dict[str, Any] = json.loads(path.read_text())
    image = processor.get("image_processor")
    if "video_processor" in processor or not isinstance(image, Mapping):
        return
    video = {k: image[k] for k in _VIDEO_FIELDS if k in image}
    video["video_processor_type"] = video_type
    processor["video_processor"] = video
    path.write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")


def serve_command(out: str | os.PathLike[str], *, cpu: bool) -> str:
    """The ``vllm serve`` command line for an exported directory.

    ``--dtype`` is the dtype the weights were saved in (vLLM would otherwise serve a
    float32 checkpoint in bfloat16 without a word); on CPU ``--gpu-memory-utilization``
    is the share of RAM vLLM reserves (its default, 0.92, fails to start next to anything).
    """
    config = json.loads((Path(out) / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "auto")
    parts = ["vllm", "serve", str(out), "--trust-request-mm-kwargs", "--dtype", dtype]
    if cpu:
        parts += ["--gpu-memory-utilization", str(CPU_MEMORY_UTILIZATION)]
    return shlex.join(parts)


def cpu_head_dim_problem(out: str | os.PathLike[str]) -> str | None:
    """A note when the LLM's attention heads are too small for vLLM's CPU backend."""
    text = json.loads((Path(out) / "config.json").read_text()).get("text_config", {})
    head_dim = text.get("head_dim")
    if head_dim is None and text.get("hidden_size") and text.get("num_attention_heads"):
        head_dim = int(text["hidden_size"]) // int(text["num_attention_heads"])
    if head_dim is None or int(head_dim) >= CPU_MIN_HEAD_DIM:
        return None
    return (
        f"note: the LLM's head_dim is {head_dim}; vLLM's CPU attention needs head_dim >= "
        f"{CPU_MIN_HEAD_DIM} (a CPU server starts, then fails the first request); GPUs serve it"
    )
