"""Exact, reversible instance patching.

Everything ``flexproj.patch`` changes on a model or processor goes through
:meth:`Patcher.set`, which remembers what was there; :meth:`Patcher.undo` puts it back
in reverse order. Transformers' classes are never modified, only instances.

Copies: a patched model may be deep-copied (an EMA copy, a distillation teacher). The
log holds the patched objects, the previous values and bound methods, all of which
``copy.deepcopy`` maps onto the copy through its memo, so the copy's ``unpatch`` restores
the copy's own modules. Method overrides must therefore read everything from ``self``
(never close over a model, a module or a state object); :meth:`override_method` binds
them so that a copy rebinds them to itself.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["MISSING", "Patcher", "stock_method"]


class _Missing:
    """'Nothing was on the instance': a singleton that survives copy, deepcopy and pickle."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __copy__(self) -> _Missing:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Missing:
        return self

    def __reduce__(self) -> str:
        return "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


def stock_method(obj: Any, name: str) -> Callable[..., Any]:
    """``obj``'s class implementation of ``name``, bound to ``obj`` (what an override wraps).

    A ``functools.partial`` rather than a bound method: with a bound method, a graph break
    inside the stock method under a non-fullgraph torch.compile (torch 2.13) recursed
    without end through the override (tests/test_compile.py runs that case).
    """
    return functools.partial(getattr(type(obj), name), obj)


class Patcher:
    """Records attribute changes on objects so they can be undone exactly."""

    def __init__(self) -> None:
        self._log: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, remembering what was there.

        Whether the old value lived in the instance (``__dict__``, or a Module's
        ``_modules``) or came from the class is remembered too, so undo deletes an
        instance override rather than freezing a class attribute onto the instance.
        """
        if isinstance(obj, nn.Module) and name in obj._modules:
            old: Any = obj._modules[name]
        elif hasattr(getattr(type(obj), name, None), "__set__"):
            old = getattr(obj, name)  # a data descriptor (property, tensor.requires_grad)
        else:
            old = vars(obj).get(name, MISSING) if hasattr(obj, "__dict__") else MISSING
        self._log.append((obj, name, old))
        setattr(obj, name, value)

    def override_method(self, obj: Any, name: str, impl: Callable[..., Any]) -> None:
        """Make ``obj.name(...)`` call ``impl(obj, ...)``, on this instance only.

        The override carries the class method's name, docstring and signature
        (``generate()`` picks kwargs by ``inspect.signature``). ``impl`` must be a function
        of ``self`` that reads its state from ``self``: the bound method is rebound by
        ``copy.deepcopy`` to the copy.
        """
        stock = getattr(type(obj), name)

        @functools.wraps(stock)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return impl(self, *args, **kwargs)

        self.set(obj, name, types.MethodType(method, obj))

    def undo(self) -> None:
        while self._log:
            obj, name, old = self._log.pop()
            if old is MISSING:
                if name in vars(obj):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
