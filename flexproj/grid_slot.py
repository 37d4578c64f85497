"""The projector slot of families whose stock projector maps a fixed square tower grid per
image or tile to a fixed square token grid (Gemma 3: AvgPool2d + RMSNorm + linear;
SmolVLM: pixel shuffle + linear): :class:`SquareGridSlot`. Shared adapter machinery, not a
family: it knows no transformers class.
"""

from __future__ import annotations

import torch
from torch import nn

from flexproj.pooling import Grid, pool_grid, target_grid
from flexproj.state import STATE_ATTR, PatchState, state_of

__all__ = ["SquareGridSlot", "install_square_slot", "unit_tokens"]


class SquareGridSlot(nn.Module):
    """Stands in the stock projector: ``(units, G*G, C) -> (units, h*w, D)``, or
    ``(1, sum h_i*w_i, D)`` under per-image budgets that differ (``pad_units``: ``(units,
    max h_i*w_i, D)``, zero-padded); units are images, crops or tiles, in the order the
    tower saw them.

    ``(h, w) = flexproj.target_grid(N, grid)`` on the G x G tower grid (a FlexProjector:
    pool, then LayerNorm + SwiGLU) or on the stock projector's T x T output grid
    (``projector="stock"``: its outputs pooled). The stock projector stays inside as
    ``stock`` (it follows ``.to()``; inside ``flexproj.disabled`` the slot runs it).
    """

    def __init__(
        self,
        projector: nn.Module | None,
        stock: nn.Module,
        side: int,
        stock_side: int,
        *,
        pad_units: bool = False,
    ) -> None:
        super().__init__()
        self.projector = projector  # None with projector="stock"
        self.stock = stock
        self.side = side  # G: the tower's patch grid side
        self.stock_side = stock_side  # T: the stock projector's output grid side
        # per-image budgets that differ: (units, n_max, D) zero-padded, for a caller that
        # splits by units and trims (SmolVLM), instead of (1, sum n_i, D)
        self.pad_units = pad_units

    def extra_repr(self) -> str:
        return f"grid={self.side}x{self.side}, stock grid={self.stock_side}x{self.stock_side}"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        state = state_of(self)
        if state is None or not state.enabled:
            return self.stock(features)
        G = self.side
        if features.shape[1] != G * G:
            raise ValueError(
                f"the vision tower gave {features.shape[1]} tokens per unit, expected the "
                f"{G}x{G} patch grid ({G * G})"
            )
        budgets = state.unit_budgets(features.shape[0], units_are_images=True)
        for n in set(budgets):
            state.adapter.check_budget(n, state.native_tokens)
        if len(set(budgets)) == 1:
            return self.pool_project(state, features, budgets[0])
        # per-image budgets: each unit alone, in unit order
        rows = [self.pool_project(state, features[i : i + 1], n)[0] for i, n in enumerate(budgets)]
        if not self.pad_units:
            return torch.cat(rows)[None]  # (1, sum n_i, D)
        longest = max(r.shape[0] for r in rows)
        return torch.stack([nn.functional.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows])

    def pool_project(self, state: PatchState, features: torch.Tensor, n: int) -> torch.Tensor:
        """``(units, G*G, C) -> (units, h*w, D)``: pool + project (FlexProjector), or the
        stock projector's ``(units, T*T, D)`` outputs pooled (``projector="stock"``, and the
        native-budget rule at the stock count T*T: the stock projector alone)."""
        if self.projector is not None and not state.runs_stock(n, self.stock_side**2):
            grid: Grid = (self.side, self.side)
            return self.projector(features, tokens=n, grid=grid)
        stock_grid: Grid = (self.stock_side, self.stock_side)
        return pool_grid(self.stock(features), stock_grid, target_grid(n, stock_grid))


def install_square_slot(
    state: PatchState,
    parent: nn.Module,
    attribute: str,
    side: int,
    stock_side: int,
    slot_cls: type[SquareGridSlot] = SquareGridSlot,
    **slot_kwargs: bool,
) -> SquareGridSlot:
    """Put a ``slot_cls`` in ``parent.attribute`` (recorded on ``state.model_patcher``),
    holding the stock module (frozen with a FlexProjector) and the budget's grid: G x G
    (flex) or T x T (stock), read back by :func:`unit_tokens`."""
    grid_side = side if state.mode == "flex" else stock_side
    state.model_facts["grid"] = (grid_side, grid_side)
    stock = getattr(parent, attribute)
    state.adapter.freeze_stock(stock, state)
    projector = state.projector if state.mode == "flex" else None
    slot = slot_cls(projector, stock, side, stock_side, **slot_kwargs)
    setattr(slot, STATE_ATTR, state)
    state.model_patcher.set(parent, attribute, slot)
    return slot


def unit_tokens(state: PatchState, budget: int) -> int:
    """Placeholder tokens per unit (image, crop, tile) under ``budget``: ``h*w`` of
    ``target_grid(budget, grid)`` on the grid :func:`install_square_slot` recorded."""
    grid = state.model_facts["grid"]
    h, w = target_grid(state.adapter.check_budget(budget, grid[0] * grid[1]), grid)
    return h * w
