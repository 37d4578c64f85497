"""Test helpers: tiny offline VLMs of every registered family (see :mod:`.tiny_models`).

Needs Pillow (the ``test`` extra): without it, importing this package stops with one line
naming the extra to install.
"""

from flexproj.errors import require_extra

require_extra({"PIL": "Pillow"}, extra="test", feature="flexproj.testing")

from typing import Any  # noqa: E402

from . import tiny_models  # noqa: E402
from .tiny_models import (  # noqa: E402
    tiny_images,
    tiny_spec,
    tiny_specs,
    tiny_tokenizer,
    tiny_vlm,
)

__all__ = [
    "FAMILIES",
    "IMAGE_PLACEHOLDER",
    "tiny_images",
    "tiny_spec",
    "tiny_specs",
    "tiny_tokenizer",
    "tiny_vlm",
]


def __getattr__(name: str) -> Any:
    """``FAMILIES`` and ``IMAGE_PLACEHOLDER``, read from the registered families on first use
    (importing this package loads no family)."""
    if name in ("FAMILIES", "IMAGE_PLACEHOLDER"):
        return getattr(tiny_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
