"""flexproj: variable vision-token projectors for Hugging Face VLMs (TokenFLEX).

Swap a VLM's projector for a :class:`FlexProjector`, keep its processor's
placeholders in step, and pick the number of vision tokens per call::

    model = flexproj.patch(model, processor, tokens=144)
    with flexproj.tokens(64):
        out = model.generate(**processor(text=..., images=...))
"""

from flexproj._version import __version__
from flexproj.budget import current_tokens, tokens
from flexproj.kernels import BackendUnavailable, available_backends
from flexproj.pooling import pool_grid, pool_packed, target_grid
from flexproj.projector import FlexProjector

__all__ = [
    "BackendUnavailable",
    "FlexProjector",
    "__version__",
    "available_backends",
    "current_tokens",
    "pool_grid",
    "pool_packed",
    "target_grid",
    "tokens",
]
