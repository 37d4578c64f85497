"""The per-call token budget: ``with flexproj.tokens(64): ...``.

A :class:`contextvars.ContextVar` holds it, so each thread and each asyncio task sees
its own value, and nested blocks restore the outer one on exit. Patched models and
processors read it through :func:`current_tokens`; outside any block a patched model
takes the budget its inputs were built with (recorded when the patched processor built
them: the inputs ledger in :mod:`flexproj.family`), and
a patched processor the default given to :func:`flexproj.patch`.

``tokens(n)`` is also a decorator, for plain functions, coroutine functions and
generator functions alike: a generator gets the budget around each of its steps, so
one driven step by step from different threads or contexts (as web frameworks drive
streaming responses) keeps it.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import operator
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from flexproj.errors import BudgetError

#: a budget: one int for every image, or one int per image in processor order
Budget = int | tuple[int, ...]

_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "flexproj_tokens", default=None
)

#: (instance id, reset token) of the tokens() blocks open in this context
_ENTERED: contextvars.ContextVar[tuple[tuple[int, contextvars.Token[Any]], ...]] = (
    contextvars.ContextVar("flexproj_tokens_entered", default=())
)

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Budget", "budget_spec", "budget_value", "current_tokens", "tokens"]


def budget_value(n: object) -> int:
    """``n`` as a budget: a positive integer (ints and integer-like values such as
    ``numpy.int64``; bools, floats and strings are refused with a :class:`BudgetError`)."""
    if isinstance(n, (bool, float, str, bytes)):
        raise BudgetError(f"a budget must be a positive int, got {n!r} ({type(n).__name__})")
    try:
        value = operator.index(n)  # type: ignore[arg-type]
    except TypeError:
        raise BudgetError(
            f"a budget must be a positive int, got {n!r} ({type(n).__name__})"
        ) from None
    if value <= 0:
        raise BudgetError(f"a budget must be a positive int, got {value}")
    return value


def budget_spec(n: object) -> Budget:
    """``n`` as a budget: one positive int, or a non-empty sequence of them (one per image)."""
    if isinstance(n, (str, bytes)) or not hasattr(n, "__iter__"):
        return budget_value(n)
    if getattr(n, "ndim", 1) == 0:  # a numpy / torch scalar
        return budget_value(n)
    values = tuple(budget_value(v) for v in n)
    if not values:
        raise BudgetError("a per-image budget list must name at least one budget")
    return values


class tokens:
    """Use ``n`` vision tokens per image (per crop, tile, temporal patch) inside the block.

    ``n`` is one int for every image, or a sequence with one budget per image, in the
    order the processor receives the images of the batch (an image's budget covers all
    its crops, tiles or temporal patches).
    """

    def __init__(self, n: object) -> None:
        self.n: Budget = budget_spec(n)
        self._last: contextvars.Token[Budget | None] | None = None

    def __enter__(self) -> Budget:
        reset = _BUDGET.set(self.n)
        # kept per context, so one instance shared by threads or tasks exits each block
        # with that block's own token
        _ENTERED.set((*_ENTERED.get(), (id(self), reset)))
        self._last = reset
        return self.n

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entered = _ENTERED.get()
        mine = [i for i, (owner, _) in enumerate(entered) if owner == id(self)]
        if mine:
            reset = entered[mine[-1]][1]
            _ENTERED.set(entered[: mine[-1]] + entered[mine[-1] + 1 :])
        else:  # exited in another context than the one it was entered in
            assert self._last is not None
            reset = self._last
        try:
            _BUDGET.reset(reset)
        except ValueError:  # exited in another context (a generator resumed elsewhere)
            previous = reset.old_value
            _BUDGET.set(None if previous is contextvars.Token.MISSING else previous)

    def __call__(self, func: F) -> F:
        n = self.n
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with tokens(n):
                    return await func(*args, **kwargs)

            return run_async  # type: ignore[return-value]
        if inspect.isasyncgenfunction(func):
            raise BudgetError(
                f"@flexproj.tokens cannot decorate the async generator {func.__qualname__}: "
                "use `with flexproj.tokens(n):` around the model calls inside it"
            )
        if inspect.isgeneratorfunction(func):

            @functools.wraps(func)
            def run_steps(*args: Any, **kwargs: Any) -> Any:
                with tokens(n):
                    gen = func(*args, **kwargs)
                    value = None
                while True:
                    with tokens(n):  # each step, in whatever context it runs
                        try:
                            item = gen.send(value)
                        except StopIteration as stop:
                            return stop.value
                    value = yield item

            return run_steps  # type: ignore[return-value]

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            with tokens(n):
                return func(*args, **kwargs)

        return run  # type: ignore[return-value]


def current_tokens(default: Budget | None = None) -> Budget | None:
    """The budget in force: the innermost ``tokens()`` block, else ``default``."""
    value = _BUDGET.get()
    return default if value is None else value
