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


class ConfigError(FlexprojError, ValueError):
    """An option or config value that cannot work; raised before anything runs."""


class MissingExtraError(FlexprojError, ImportError):
    """A feature needs a package that a plain ``pip install flexproj`` does not bring."""


def require_extra(packages: dict[str, str], *, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError`, one line naming the extra, unless every module of
    ``packages`` (import name -> distribution name) imports."""
    import importlib

    missing = []
    for module, package in packages.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingExtraError(
            f"{feature} needs {', '.join(missing)}, which a plain install does not bring: "
            f"pip install 'flexproj[{extra}]'"
        )
