"""Errors flexproj raises on purpose; each says what was wrong and what to do."""

from __future__ import annotations


class FlexprojError(Exception):
    """Base class of flexproj's own errors."""


class UnsupportedModelError(FlexprojError, TypeError):
    """The model (or processor) is of a type no registered adapter handles."""


class BudgetError(FlexprojError, ValueError):
    """A token budget this model cannot serve (non-positive, or above its native count)."""


class TokenCountMismatch(FlexprojError, ValueError):
    """The inputs carry a different number of image placeholders than the model produces."""


class CheckpointError(FlexprojError, ValueError):
    """A flexproj checkpoint is missing, damaged, or belongs to another model."""


class PatchError(FlexprojError, RuntimeError):
    """Patching or unpatching failed; the model was left as it was."""
