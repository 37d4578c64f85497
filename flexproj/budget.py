"""The per-call token budget: ``with flexproj.tokens(64): ...``.

A :class:`contextvars.ContextVar` holds it, so each thread and each asyncio task
sees its own value, and nested blocks restore the outer one on exit. Patched models
and processors read it through :func:`current_tokens`; outside any block they use the
default given to :func:`flexproj.patch`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from flexproj.pooling import check_token_count

_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "flexproj_tokens", default=None
)


@contextlib.contextmanager
def tokens(n: int) -> Iterator[int]:
    """Use ``n`` vision tokens per image (per tile, per temporal patch) inside the block."""
    n = check_token_count(n)
    token = _BUDGET.set(n)
    try:
        yield n
    finally:
        _BUDGET.reset(token)


def current_tokens(default: int | None = None) -> int | None:
    """The budget in force: the innermost ``tokens()`` block, else ``default``."""
    value = _BUDGET.get()
    return default if value is None else value
