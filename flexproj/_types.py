"""Type aliases shared across modules."""

from typing import Any

#: A transformers model. Typed loosely on purpose: ``nn.Module.__getattr__`` is typed
#: ``Tensor | Module``, which hides ``config`` and submodules from the type checker.
Model = Any
