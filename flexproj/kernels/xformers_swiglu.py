"""SwiGLU through ``xformers.ops.swiglu`` (optional dependency).

Importing ``xformers.ops`` pulls in torch._dynamo/_inductor (about a second) and,
where the wheel was built for another torch/CUDA, logs a loud warning about its C++
extension; neither matters for swiglu, which runs PyTorch ops since 0.0.34. So the
import is lazy and its log output is silenced.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch


@functools.cache
def load_xformers_swiglu() -> Callable[..., torch.Tensor]:
    """Import ``xformers.ops.swiglu`` quietly; raises ImportError if xformers is absent."""
    logger = logging.getLogger("xformers")
    level, logger_disabled = logger.level, logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            from xformers.ops import swiglu
    finally:
        logger.setLevel(level)
        logger.disabled = logger_disabled
    return swiglu


def swiglu_xformers(
    x: torch.Tensor,
    w12: torch.Tensor,
    b12: torch.Tensor | None,
    w3: torch.Tensor,
    b3: torch.Tensor | None,
) -> torch.Tensor:
    swiglu: Any = load_xformers_swiglu()
    hidden = w12.shape[0] // 2
    w1, w2 = w12.view(2, hidden, -1).unbind(0)  # views of one storage: xformers' packing
    b1, b2 = (None, None) if b12 is None else b12.view(2, hidden).unbind(0)
    return swiglu(x, w1, b1, w2, b2, w3, b3)
