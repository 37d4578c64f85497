"""The budget the inputs carry: what a patched processor built them with.

A processor patched by :func:`flexproj.patch` adds one key to what it returns,
:data:`BUDGETS_KEY` (``"flexproj_budgets"``): an int64 tensor ``(batch, images, 2)`` holding,
for each sample and each of its images in processor order, ``(budget, units)``: the
image's budget and how many projector rows (crops, tiles) it becomes. Samples with fewer
images are padded with ``(0, 0)``; ``units`` 0 means "not known" (the budget is still
exact). A patched model's ``forward`` and ``generate`` read it there, so the budget is part
of the inputs: it follows them through slicing a sub-batch, re-padding, stacking samples
built separately (:func:`collate`), ``generate``'s expansion (one row per sample, repeated
with the sample) and any thread or process, with no side channel keyed by token ids.

Per sample rather than per image, so ``generate``'s ``repeat_interleave`` over the batch
and a slice of samples keep each sample's own images' budgets. Three dimensions, so it is
never mistaken for a per-token tensor (``(batch, sequence)``) by code that pads those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flexproj.budget import Budget, current_tokens
from flexproj.errors import TokenCountMismatch
from flexproj.state import PatchState, call_budget

__all__ = ["BUDGETS_KEY", "Carried", "budget_scope", "check_block", "collate", "deal", "decode"]

#: the processor output key (and forward / generate keyword) that carries the budgets
BUDGETS_KEY = "flexproj_budgets"

#: what a processor call noted per image: (units, placeholder tokens), None where unknown
Noted = Sequence[tuple[int | None, int | None]]


@dataclass(frozen=True)
class Carried:
    """The budgets a batch carries, flattened over its samples' images in order."""

    #: one int when every image has it, else one budget per image
    budget: Budget
    #: projector rows (crops, tiles) per image, or None where any is unknown
    units: tuple[int, ...] | None
    #: one budget per image (also when ``budget`` is one int)
    per_image: tuple[int, ...]


def deal(
    input_ids: Any, budget: Budget, noted: Noted | None, image_token_id: int | None
) -> list[list[list[int]]] | None:
    """Rows of :data:`BUDGETS_KEY` for one processor call: its images dealt to samples in
    order, each sample taking images until their placeholder counts reach its own (every
    image has at least one placeholder, so the split is unique); ``None`` when the noted
    counts do not add up (nothing is then carried: the model uses the budget in force)."""
    if not noted or image_token_id is None:
        return None
    ids = np.asarray(input_ids.detach().cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    rows = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
    budgets = [budget] * len(noted) if isinstance(budget, int) else list(budget)
    if len(budgets) != len(noted) or any(t is None or t <= 0 for _, t in noted):
        return None
    out: list[list[list[int]]] = []
    start = 0
    for row in rows:
        want, got, stop = int((row == image_token_id).sum()), 0, start
        while got < want and stop < len(noted):
            got += int(noted[stop][1] or 0)
            stop += 1
        if got != want:
            return None
        out.append([[budgets[i], int(noted[i][0] or 0)] for i in range(start, stop)])
        start = stop
    if start != len(noted):
        return None
    width = max(1, *(len(r) for r in out))
    return [r + [[0, 0]] * (width - len(r)) for r in out]


def decode(value: Any) -> Carried | None:
    """What a :data:`BUDGETS_KEY` value says (a tensor or nested lists), or None when it
    names no image."""
    if value is None:
        return None
    rows = torch.as_tensor(value).reshape(-1, 2).tolist()  # (batch * images, 2)
    images = [(int(b), int(u)) for b, u in rows if b > 0]
    if not images:
        return None
    per_image = tuple(b for b, _ in images)
    units = None if any(u <= 0 for _, u in images) else tuple(u for _, u in images)
    budget: Budget = per_image[0] if len(set(per_image)) == 1 else per_image
    return Carried(budget=budget, units=units, per_image=per_image)


def collate(values: Sequence[Any]) -> torch.Tensor:
    """Stack the :data:`BUDGETS_KEY` values of separately built batches (as a collator
    stacks samples): image columns zero-padded to the widest, samples concatenated."""
    tensors = [torch.as_tensor(v, dtype=torch.long).reshape(-1, *torch.as_tensor(v).shape[-2:])
               for v in values]  # fmt: skip
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in tensors])


def agrees(block: Budget, carried: Carried) -> bool:
    """Whether a ``flexproj.tokens`` block gives the images the budgets they carry."""
    if isinstance(block, int):
        return all(b == block for b in carried.per_image)
    return tuple(block) == carried.per_image


def check_block(carried: Carried, unit: str) -> None:
    """:class:`TokenCountMismatch` when an explicit block disagrees with the inputs."""
    block = current_tokens()
    if block is None or agrees(block, carried):
        return
    shown = list(block) if not isinstance(block, int) else block
    raise TokenCountMismatch(
        f"Image features and image tokens do not match: the inputs were built at "
        f"{list(carried.per_image)} vision tokens per {unit} (one per image) but the "
        f"flexproj.tokens({shown}) block around the model call says otherwise. Build the "
        "inputs inside the same block, or call the model with no block (it then runs at the "
        "budgets the inputs carry)."
    )


@contextlib.contextmanager
def budget_scope(state: PatchState, value: Any) -> Iterator[None]:
    """Run the block under the budgets ``value`` (a :data:`BUDGETS_KEY` value) carries,
    after checking them against an explicit block; with nothing carried, under the block
    or default in force. While torch.compile traces: see :func:`traced_check`."""
    if torch.compiler.is_compiling():
        if isinstance(value, torch.Tensor):
            traced_check(value, state.default_budget)
        yield
        return
    carried = decode(value)
    if carried is None:
        yield
        return
    check_block(carried, state.adapter.unit)
    with call_budget(carried.budget, carried.units):
        yield


def traced_check(value: torch.Tensor, budget: int) -> None:
    """Inside a compiled graph the model runs at its default ``budget`` (a plain int that
    Dynamo guards on); inputs built at another budget fail this runtime check."""
    budgets = value[..., 0]  # (batch, images)
    torch._assert_async(
        ((budgets == 0) | (budgets == budget)).all(),
        "flexproj: a compiled model runs at its default budget; these inputs carry another "
        "(run them eagerly, or patch with tokens=<their budget>)",
    )
