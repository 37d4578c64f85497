"""Tiny exported models for the vLLM tests: built offline, saved, exported.

vLLM's CPU attention needs head sizes of at least 32, so the text towers here use
2 heads of 32 (hidden 64) instead of tiny_vlm's 4 of 16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flexproj
from flexproj.serving.export import export
from flexproj.testing import tiny_vlm

TEXT = {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32}
#: family -> (tiny_vlm family, overrides, default budget saved in the checkpoint)
FAMILIES: dict[str, tuple[str, dict[str, Any], int]] = {
    "llava": ("llava", {"text_config": TEXT}, 16),
    "llava_siglip": ("llava_siglip", {"text_config": TEXT}, 16),
    "llava_next": ("llava_next", {"text_config": TEXT}, 16),
    "llava_onevision": ("llava_onevision", {"text_config": TEXT}, 16),
    "qwen2_vl": ("qwen2_vl", {"text_config": TEXT}, 16),
    "qwen2_5_vl": ("qwen2_5_vl", {"text_config": TEXT}, 16),
}


def build(family: str, root: Path, seed: int = 0) -> tuple[Any, Any, Path]:
    """``(patched transformers model, its processor, exported directory)`` under ``root``."""
    name, overrides, default = FAMILIES[family]
    model, processor = tiny_vlm(name, seed=seed, **overrides)
    base, proj, out = root / f"{family}-base", root / f"{family}-projector", root / family
    model.save_pretrained(base)
    processor.save_pretrained(base)  # image-only for Qwen: export adds the video processor
    flexproj.patch(model, processor, tokens=default)
    flexproj.save_pretrained(model, proj)
    export(base, proj, out, overwrite=True)
    return model, processor, out
