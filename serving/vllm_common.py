"""Pieces the flexproj vLLM models share: the per-item budget field, grouping items by
budget, and loading the projector from the exported model directory.

Imports vLLM: only the per-family model modules import this (vLLM loads them lazily).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from vllm.multimodal.inputs import MultiModalFieldConfig

from flexproj.checkpoint import read_checkpoint
from flexproj.projector import FlexProjector
from flexproj.serving.budget import BUDGET_KEY, flex_config, request_budget

#: the processed field carrying each image's budget to ``embed_multimodal``
BUDGET_FIELD = "flexproj_tokens"


def build_projector(hf_config: Any) -> FlexProjector:
    """An (uninitialised) FlexProjector of the exported checkpoint's shape."""
    return FlexProjector(**flex_config(hf_config)["projector"])


def default_budget(hf_config: Any, native: int) -> int:
    """The checkpoint's default budget, capped at ``native`` (as ``flexproj.from_pretrained``)."""
    return min(int(flex_config(hf_config)["default_tokens"]), native)


def budget_of(
    ctx: Any, mm_kwargs: Mapping[str, object], default: int, native: int, *, unit: str, caps: bool
) -> int:
    """The request's budget: its own ``mm_processor_kwargs``, else the server's
    (``--mm-processor-kwargs``), else ``default``."""
    merged = ctx.get_merged_mm_kwargs(mm_kwargs)
    return request_budget(merged, default, native, unit=unit, caps=caps)


def without_budget(mm_kwargs: Mapping[str, object]) -> dict[str, object]:
    """``mm_kwargs`` minus ours, for the Hugging Face processor."""
    return {k: v for k, v in mm_kwargs.items() if k != BUDGET_KEY}


def budget_field(modality: str) -> dict[str, MultiModalFieldConfig]:
    """Declares :data:`BUDGET_FIELD` as one value per item of ``modality``."""
    return {BUDGET_FIELD: MultiModalFieldConfig.batched(modality)}


class BudgetedProcessor:
    """What every flexproj vLLM processor adds to the family's own (mixed in first): a bad
    budget fails the request up front, the Hugging Face processor never sees the budget
    kwarg, and each image item carries its budget (:data:`BUDGET_FIELD`) to the model.

    ``items_key``: the processed field with one entry per image (its length counts them).
    ``info.budget(mm_kwargs)`` is the family's budget of a request.
    """

    items_key = "pixel_values"
    info: Any

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        self.info.budget(inputs.hf_processor_mm_kwargs)  # a bad budget fails here, clearly
        return super().apply(inputs, timing_ctx)  # type: ignore[misc]

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> Any:
        return super()._call_hf_processor(hf_data, without_budget(hf_kwargs))  # type: ignore[misc]

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: Any,
    ) -> Any:
        processed = super()._postprocess_hf_mm_data(  # type: ignore[misc]
            mm_inputs, hf_processor_mm_kwargs, processed_data
        )
        items = processed.get(self.items_key)
        if items is not None:
            budget = self.info.budget(hf_processor_mm_kwargs)
            processed[BUDGET_FIELD] = torch.full((len(items),), budget, dtype=torch.long)
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        return {**fields, **budget_field("image")}


def budgets_list(value: Any, count: int, default: int) -> list[int]:
    """The per-item budgets ``embed_multimodal`` received (a tensor or a list of 0-d tensors)."""
    if value is None:
        return [default] * count
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def by_budget(
    budgets: Sequence[int], project: Callable[[list[int], int], Sequence[torch.Tensor]]
) -> list[torch.Tensor]:
    """Call ``project(indices, budget)`` once per distinct budget; results in item order."""
    out: list[torch.Tensor | None] = [None] * len(budgets)
    for n in sorted(set(budgets)):
        idx = [i for i, b in enumerate(budgets) if b == n]
        for i, y in zip(idx, project(idx, n), strict=True):
            out[i] = y
    return [y for y in out if y is not None]


def skip_projector_weights(
    weights: Iterable[tuple[str, torch.Tensor]], projector: nn.Module, stock_prefix: re.Pattern
) -> Iterator[tuple[str, torch.Tensor]]:
    """Drop the stock projector's weights and, where vLLM globbed ``flexproj.safetensors``
    from the model directory, its bare keys (``norm.weight``, ``mlp.w12.weight`` ...)."""
    flex_keys = set(projector.state_dict())
    for name, tensor in weights:
        if name in flex_keys or stock_prefix.search(name):
            continue
        yield name, tensor


def load_projector(projector: nn.Module, model_dir: str, prefix: str) -> set[str]:
    """Load ``flexproj.safetensors`` of the served directory; returns the loaded names."""
    if not os.path.isdir(model_dir):
        raise ValueError(
            f"flexproj serves exported model directories; {model_dir!r} is not a local directory "
            "(run `flexproj export BASE PROJECTOR OUT` and serve OUT)"
        )
    _, tensors = read_checkpoint(model_dir)
    projector.load_state_dict(tensors)
    return {f"{prefix}{name}" for name in tensors}
