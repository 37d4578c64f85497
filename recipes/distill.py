"""``--init distill``: warm-start the FlexProjector from the stock projector.

Before training, the FlexProjector is fitted to reproduce what the model's *stock*
projector feeds the LLM, on the training images, with the vision tower only (no LLM
forward). Each step:

1. inside ``flexproj.disabled(model)`` the stock path runs, and
   ``model.get_image_features(...)`` gives the stock outputs: the target, under ``no_grad``;
2. outside it, ``model.get_image_features(...)`` inside ``flexproj.tokens(N)`` gives the
   FlexProjector's outputs;
3. loss = relative MSE (MSE / mean square of the target) + ``w`` * (1 - cosine
   similarity), per token; AdamW on the projector only, cosine-decayed learning rate.

Running both paths costs a second vision-tower forward per step; in exchange it needs no family internals: whatever the stock model does between
the tower and the LLM (CLS dropping, pixel shuffle, AnyRes packing, Qwen's merger and
window order) is what the target is.

**Matched grids.** The two outputs are compared token for token, so N is the budget at
which the FlexProjector's pooled grid *is* the stock output grid, from the family
recipe's ``distill_tokens``: LLaVA, the tower grid (576 at 336 px, no pooling); Qwen,
an uncapped budget (every image keeps its native merged grid, each token the mean of
its 2x2 patches, as the merger's 2x2 unit); InternVL, the stock count per tile (256 at
448 px: 16x16 cells of 2x2 patches, exactly the blocks pixel shuffle concatenates, in
the same row-major order). A count mismatch is an error naming both counts.

Images are grouped by size so that each step's images have equal grids (Qwen keeps
native resolution). The result (cosine before/after on a fixed batch, loss history) is
printed and returned; the trainer writes it to ``<output_dir>/distill.json``.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

import flexproj
from flexproj._types import Model
from flexproj.recipes.data import DataError, Record, open_image
from flexproj.recipes.family import FamilyRecipe

__all__ = ["distill_projector"]


def _batches(records: Sequence[Record], batch_size: int, seed: int) -> list[list[Any]]:
    """Image paths in same-size batches, shuffled deterministically."""
    by_size: dict[tuple[int, int], list[Any]] = defaultdict(list)
    for record in records:
        for path in record.images:
            with Image.open(path) as image:
                by_size[image.size].append(path)
    batches = [
        paths[i : i + batch_size]
        for _, paths in sorted(by_size.items())
        for i in range(0, len(paths), batch_size)
    ]
    random.Random(seed).shuffle(batches)
    return batches


def _image_inputs(
    processor: Any,
    recipe: FamilyRecipe,
    images: list[Image.Image],
    device: torch.device,
    accepted: set[str] | None,
) -> dict[str, Any]:
    """The processor's image outputs for ``images`` (one placeholder prompt per image)."""
    placeholder = recipe.image_placeholder(processor)
    encoding = processor(
        text=[placeholder] * len(images), images=images, return_tensors="pt", padding=True
    )
    ids = encoding["input_ids"]
    out = {}
    for key, value in encoding.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape:
            continue  # per-token text outputs
        if accepted is not None and key not in accepted:
            continue
        out[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    return out


def _features(model: Model, inputs: dict[str, Any]) -> list[torch.Tensor]:
    """What the projector hands the LLM, one ``(tokens, D)`` tensor per image / tile."""
    out = model.get_image_features(**inputs)
    pooled = getattr(out, "pooler_output", out)
    if isinstance(pooled, torch.Tensor):
        pooled = list(pooled) if pooled.dim() == 3 else [pooled]
    return [t.reshape(-1, t.shape[-1]) for t in pooled]


def _match(
    pred: list[torch.Tensor], target: list[torch.Tensor], tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    p_rows, t_rows = [x.shape[0] for x in pred], [x.shape[0] for x in target]
    if p_rows != t_rows:
        raise DataError(
            f"--init distill: the FlexProjector at {tokens} tokens gives {p_rows} tokens per unit but "
            f"the stock projector gives {t_rows}; the grids must match to compare them token for "
            "token (see the family recipe's distill_tokens)"
        )
    return torch.cat(pred).float(), torch.cat(target).float()


def _metrics(
    pred: torch.Tensor, target: torch.Tensor, cosine_weight: float
) -> tuple[torch.Tensor, float, float]:
    """``(loss, relative MSE, mean cosine)``; the MSE is relative to the target's mean square,
    so the loss weighs the two terms alike whatever the LLM's embedding scale."""
    mse = F.mse_loss(pred, target) / target.pow(2).mean().clamp_min(1e-12)
    cosine = F.cosine_similarity(pred, target, dim=-1).mean()
    return mse + cosine_weight * (1 - cosine), float(mse.detach()), float(cosine.detach())


def distill_projector(
    model: Model,
    processor: Any,
    recipe: FamilyRecipe,
    records: Sequence[Record],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    cosine_weight: float = 1.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit the patched ``model``'s FlexProjector to its stock projector (module docstring).

    ``processor`` must not be patched yet (patch it afterwards). Returns a summary dict:
    ``tokens``, ``steps``, ``cosine_before`` / ``cosine_after`` and ``mse_before`` /
    ``mse_after`` on a fixed batch, and the per-step ``history``.
    """
    if not flexproj.is_patched(model):
        raise flexproj.PatchError("distill_projector needs a model patched by flexproj.patch")
    projector = flexproj.get_projector(model)
    tokens = recipe.distill_tokens(model)
    device = next(projector.parameters()).device
    batches = _batches(records, batch_size, seed)
    if not batches:
        raise DataError("--init distill: no training images")
    signature = inspect.signature(model.get_image_features).parameters
    accepted = None if any(p.kind == p.VAR_KEYWORD for p in signature.values()) else set(signature)

    def load(i: int) -> dict[str, Any]:
        images = [
            recipe.prepare_image(open_image(p), processor, False) for p in batches[i % len(batches)]
        ]
        return _image_inputs(processor, recipe, images, device, accepted)

    def compare(inputs: dict[str, Any], grad: bool) -> tuple[torch.Tensor, float, float]:
        with flexproj.disabled(model), torch.no_grad():
            target = recipe.stock_features(_features(model, inputs), model)
        with flexproj.tokens(tokens), torch.set_grad_enabled(grad):
            pred = _features(model, inputs)
        return _metrics(*_match(pred, target, tokens), cosine_weight)

    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in projector.parameters():
        p.requires_grad_(True)
    try:
        probe = load(0)
        _, mse_before, cos_before = compare(probe, grad=False)
        log(
            f"distill: {steps} steps at budget {tokens} (the stock projector's grid); cosine before {cos_before:.4f}"
        )
        optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
        )
        history: list[dict[str, float]] = []
        every = max(1, steps // 10)
        start = time.perf_counter()
        for step in range(steps):
            loss, mse, cos = compare(load(step), grad=True)
            value = float(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            history.append({"step": step + 1, "loss": value, "mse": mse, "cosine": cos})
            if (step + 1) % every == 0 or step + 1 == steps:
                log(
                    f"distill step {step + 1}/{steps}: loss {value:.4f} rel-mse {mse:.4g} cosine {cos:.4f}"
                )
        _, mse_after, cos_after = compare(probe, grad=False)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    log(
        f"distill: cosine similarity {cos_before:.4f} -> {cos_after:.4f} (relative MSE {mse_before:.4g} -> {mse_after:.4g})"
    )
    return {
        "tokens": tokens,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "cosine_weight": cosine_weight,
        "images": sum(len(b) for b in batches),
        "cosine_before": cos_before,
        "cosine_after": cos_after,
        "mse_before": mse_before,
        "mse_after": mse_after,
        "seconds": time.perf_counter() - start,
        "history": history,
    }
