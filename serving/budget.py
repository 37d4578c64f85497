"""The per-request budget of a served model, read from ``mm_processor_kwargs`` (no vLLM here).

vLLM hands a request's ``mm_processor_kwargs`` to the model's multimodal processor;
flexproj reads one key, ``tokens``, and falls back to the budget the exported
checkpoint was saved with. A bad value fails that request only, with a
:class:`flexproj.BudgetError` (a ``ValueError``: vLLM answers HTTP 400) naming the value and the range.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexproj.errors import BudgetError

#: the ``mm_processor_kwargs`` key holding the vision-token budget
BUDGET_KEY = "tokens"
#: the key of ``config.json`` that holds the flexproj checkpoint config (see export.py)
CONFIG_KEY = "flexproj"


def flex_config(hf_config: Any) -> dict[str, Any]:
    """The flexproj block of an exported model's ``config.json``, or a clear error."""
    block = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(block, Mapping) or "projector" not in block:
        raise ValueError(
            f"this model directory has no '{CONFIG_KEY}' block in its config.json; make it with "
            "`flexproj export BASE PROJECTOR OUT` and serve OUT"
        )
    return dict(block)


def request_budget(
    mm_kwargs: Mapping[str, object], default: int, native: int, *, unit: str, caps: bool
) -> int:
    """The budget of one request: ``mm_kwargs["tokens"]`` if given, else ``default``.

    ``native`` bounds it (an error above it unless ``caps``: Qwen caps per image, as the
    transformers path does). Raises :class:`BudgetError`.
    """
    value = mm_kwargs.get(BUDGET_KEY, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BudgetError(
            f"flexproj: mm_processor_kwargs['{BUDGET_KEY}'] must be a positive int (vision "
            f"tokens per {unit}), got {value!r}"
        )
    if value > native and not caps:
        raise BudgetError(
            f"flexproj: mm_processor_kwargs['{BUDGET_KEY}']={value} exceeds this model's native "
            f"{native} vision tokens per {unit}; pooling only removes tokens (use 1..{native})"
        )
    return value
