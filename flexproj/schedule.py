"""Token schedules: which vision-token budget each optimisation step trains at.

TokenFLEX samples one budget per step from {64, 144, 256} with weights 2:3:5 and
uses it for every sample of the batch. The draw for step ``s`` is a pure function
of ``(seed, s)``, so every rank of a distributed run, and a run resumed from a
checkpoint, draws the same budget at the same step without communicating.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flexproj.pooling import check_token_count

PAPER_TOKENS = (64, 144, 256)
PAPER_WEIGHTS = (2.0, 3.0, 5.0)

__all__ = ["PAPER_TOKENS", "PAPER_WEIGHTS", "TokenSchedule", "parse_schedule"]


@dataclass(frozen=True)
class TokenSchedule:
    """Weighted choice of a budget per step (``fixed(n)`` for a single budget).

    ``per_sample=True`` draws one budget per sample instead (:meth:`budget_for_sample`),
    a pure function of ``(seed, step, sample index)``: every rank computes the same draws
    for the step's global batch and a resumed run repeats them. Batches then mix budgets
    (``flexproj.tokens([...])``, one per image).
    """

    tokens: tuple[int, ...] = PAPER_TOKENS
    weights: tuple[float, ...] = PAPER_WEIGHTS
    seed: int = 0
    per_sample: bool = False
    _cum: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tokens = tuple(check_token_count(t) for t in self.tokens)
        weights = tuple(float(w) for w in self.weights)
        if not tokens:
            raise ValueError("a token schedule needs at least one budget")
        if len(weights) != len(tokens):
            raise ValueError(f"{len(tokens)} budgets but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"budgets must be distinct, got {tokens}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "weights", weights)
        total, cum = sum(weights), []
        acc = 0.0
        for w in weights:
            acc += w / total
            cum.append(acc)
        object.__setattr__(self, "_cum", tuple(cum))

    @classmethod
    def fixed(cls, tokens: int, seed: int = 0) -> TokenSchedule:
        return cls(tokens=(tokens,), weights=(1.0,), seed=seed)

    @property
    def probabilities(self) -> tuple[float, ...]:
        total = sum(self.weights)
        return tuple(w / total for w in self.weights)

    @property
    def max_tokens(self) -> int:
        return max(t for t, w in zip(self.tokens, self.weights, strict=True) if w > 0)

    @property
    def expected_tokens(self) -> float:
        return sum(t * p for t, p in zip(self.tokens, self.probabilities, strict=True))

    def _pick(self, u: float) -> int:
        for t, c in zip(self.tokens, self._cum, strict=True):
            if u < c:
                return t
        return self.tokens[-1]

    def budget_at(self, step: int) -> int:
        """The budget for optimisation step ``step`` (same on every rank and resume)."""
        return self._pick(random.Random(f"{self.seed}:{step}").random())

    def budget_for_sample(self, step: int, index: int) -> int:
        """The budget of sample ``index`` of step ``step``'s global batch (``per_sample``)."""
        return self._pick(random.Random(f"{self.seed}:{step}:sample:{index}").random())

    def budgets_for(self, step: int, batch_size: int, first: int = 0) -> list[int]:
        """Budgets of samples ``first .. first + batch_size - 1`` of step ``step``'s global
        batch: one per sample (``per_sample``), or the step's budget repeated."""
        if not self.per_sample:
            return [self.budget_at(step)] * batch_size
        return [self.budget_for_sample(step, first + i) for i in range(batch_size)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": list(self.tokens),
            "weights": list(self.weights),
            "seed": self.seed,
            "per_sample": self.per_sample,
        }


def parse_schedule(
    spec: str | Sequence[int] | int, seed: int = 0, per_sample: bool = False
) -> TokenSchedule:
    """``"64:2,144:3,256:5"``, ``"fixed:256"``, ``"256"``, ``"paper"`` or a list of budgets."""
    if isinstance(spec, int):
        return TokenSchedule((spec,), (1.0,), seed, per_sample)
    if not isinstance(spec, str):
        return TokenSchedule(tuple(spec), (1.0,) * len(spec), seed, per_sample)
    text = spec.strip()
    if text in ("paper", "tokenflex"):
        return TokenSchedule(seed=seed, per_sample=per_sample)
    if text.startswith("fixed:"):
        return TokenSchedule((int(text.removeprefix("fixed:")),), (1.0,), seed, per_sample)
    tokens, weights = [], []
    try:
        for part in text.split(","):
            t, _, w = part.partition(":")
            tokens.append(int(t))
            weights.append(float(w) if w else 1.0)
    except ValueError:
        raise ValueError(
            f"cannot parse token schedule {spec!r}; use e.g. '64:2,144:3,256:5', 'fixed:256' or 'paper'"
        ) from None
    return TokenSchedule(tuple(tokens), tuple(weights), seed, per_sample)
