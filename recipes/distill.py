"""Distillation at every budget: warm-start the FlexProjector from the stock projector.

The FlexProjector is fitted, before any LLM training, to what the model's *stock*
projector feeds the LLM **pooled to the same budget**: at budget N the target is the
stock projector's output tokens average-pooled to ``target_grid(N)`` on their own grid
(what ``flexproj.patch(model, projector="stock")`` produces under ``flexproj.tokens(N)``).
At the native budget that is the stock output itself. So the distilled projector is a
variable-token projector already: at every budget of the schedule it starts from the
training-free pool-after model. Only the vision tower runs (no LLM forward). Each step:

1. a budget N, in turn from the schedule's budgets and the native one (equal steps each);
2. the target: the stock projector's outputs pooled to N, from a twin of the model that
   shares every weight (a ``copy.deepcopy`` whose parameters are the model's own, patched
   with ``projector="stock"``: no extra weight memory), under ``no_grad``;
3. the prediction: ``model.get_image_features(...)`` inside ``flexproj.tokens(N)``;
4. loss = relative MSE (MSE / mean square of the target) + ``w`` * (1 - cosine
   similarity), per token; AdamW on the projector only, cosine-decayed learning rate.

Both paths go through ``get_image_features``, so whatever the stock model does between
the tower and the LLM (CLS dropping, pixel shuffle, AnyRes packing, Qwen's merger and
window order) is what the target is.

**Matched grids.** Prediction and target are compared token for token, so at budget N
the FlexProjector's pooled grid must be the pooled stock grid. It is at every budget up
to the stock count per unit: LLaVA pools the tower grid and the stock output grid, the
same S x S; Qwen pools both on the merged grid of each image (at most N, aspect kept);
InternVL's FlexProjector pools the 32x32 ViT grid of a tile and the stock output is the
16x16 grid after pixel shuffle: both reach ``target_grid(N)`` (the same square) for
N <= 256, and above the stock count there is no stock target (a budget over it is left
out, with a note). The native budget is the family recipe's ``distill_tokens`` (LLaVA:
the tower grid; Qwen: an uncapped budget; InternVL: the stock count per tile). A count
mismatch is an error naming both counts.

Images are grouped by size so that each step's images have equal grids (Qwen keeps
native resolution). The result (per budget: cosine and relative MSE before and after on
a fixed batch; the loss history) is logged and returned; the trainer writes it to
``<output_dir>/distill.json``, ``flexproj distill`` to ``<output_dir>/distill.json`` too.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import flexproj
from flexproj._types import Model
from flexproj.recipes.data import DataError, open_image
from flexproj.recipes.family import FamilyRecipe

__all__ = ["distill_budgets", "distill_projector", "stock_twin"]


def _batches(paths: Sequence[Path], batch_size: int, seed: int) -> list[list[Path]]:
    """Image paths in same-size batches, shuffled deterministically."""
    by_size: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for path in paths:
        with Image.open(path) as image:
            by_size[image.size].append(path)
    batches = [
        group[i : i + batch_size]
        for _, group in sorted(by_size.items())
        for i in range(0, len(group), batch_size)
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
        text=[placeholder] * len(images),
        images=recipe.processor_images([[im] for im in images]),
        return_tensors="pt",
        padding=True,
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
            f"distill: the FlexProjector at {tokens} tokens gives {p_rows} tokens per unit but "
            f"the pooled stock projector gives {t_rows}; the grids must match to compare them "
            "token for token (see the family recipe's distill_tokens)"
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


def stock_twin(model: Model) -> Model:
    """A twin of patched ``model`` running its stock projector with pooled outputs
    (``projector="stock"``), sharing every parameter and buffer with ``model``."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo)
    flexproj.unpatch(twin)
    flexproj.patch(twin, projector="stock")
    return twin


def distill_budgets(
    model: Model,
    recipe: FamilyRecipe,
    budgets: Iterable[int] = (),
    log: Callable[[str], None] = print,
    twin: Model | None = None,
) -> list[int]:
    """The budgets to distil at: ``budgets`` (e.g. the schedule's) and the native one,
    leaving out those above the stock count per unit (no stock target there)."""
    native = recipe.distill_tokens(model)
    out = sorted({*budgets, native})
    twin_native = flexproj.patch_info(twin or stock_twin(model)).native_tokens
    if twin_native is not None:
        over = [n for n in out if n > twin_native]
        if over:
            log(
                f"distill: budgets {over} exceed the stock projector's {twin_native} tokens per "
                f"{flexproj.patch_info(model).unit}: no pooled stock target there, left out"
            )
        out = [n for n in out if n <= twin_native]
    return out


@contextlib.contextmanager
def _fitting(model: Model, twin: Model, projector: nn.Module) -> Iterator[None]:
    """Only the projector trains, both models in eval mode, and the FlexProjector runs at
    the native budget too (the native-budget rule off); everything restored afterwards."""
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    rule = flexproj.patch_info(model).native
    model.eval()
    twin.eval()
    flexproj.set_native(model, "projector")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in projector.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
        flexproj.set_native(model, rule)


def _fit(
    projector: nn.Module,
    plan: Sequence[int],
    steps: int,
    lr: float,
    compare: Callable[[int, int], tuple[torch.Tensor, float, float]],
    log: Callable[[str], None],
    progress: bool,
) -> tuple[list[dict[str, float]], float]:
    """AdamW with a cosine decay, one budget of ``plan`` per step in turn; ``compare(step,
    N)`` gives ``(loss, relative MSE, cosine)``. Returns the per-step history and seconds."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    history: list[dict[str, float]] = []
    every = max(1, steps // 10)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="distill", disable=not progress, dynamic_ncols=True)
    for step in bar:
        n = plan[step % len(plan)]
        loss, mse, cos = compare(step, n)
        value = float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append({"step": step + 1, "tokens": n, "loss": value, "mse": mse, "cosine": cos})
        bar.set_postfix(N=n, loss=f"{value:.4f}")
        if not progress and ((step + 1) % every == 0 or step + 1 == steps):
            log(
                f"distill step {step + 1}/{steps} (N={n}): loss {value:.4f} rel-mse {mse:.4g} "
                f"cosine {cos:.4f}"
            )
    bar.close()
    return history, time.perf_counter() - start


def distill_projector(
    model: Model,
    processor: Any,
    recipe: FamilyRecipe,
    images: Sequence[Any],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    cosine_weight: float = 1.0,
    seed: int = 0,
    budgets: Iterable[int] = (),
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the patched ``model``'s FlexProjector to its pooled stock projector at every
    budget of ``budgets`` and the native one (module docstring).

    ``images``: image paths, or records with ``.images`` (``recipes.data.Record``).
    ``processor`` must not be patched yet (patch it afterwards). Returns a summary dict:
    ``budgets``, ``per_budget`` (``{N: cosine_before, cosine_after, mse_before,
    mse_after}`` on a fixed batch), the native budget's numbers at the top level
    (``tokens``, ``cosine_before`` ...), and the per-step ``history``.
    """
    if not flexproj.is_patched(model) or flexproj.patch_info(model).mode != "flex":
        raise flexproj.PatchError("distill_projector needs a model patched with a FlexProjector")
    projector = flexproj.get_projector(model)
    tokens = recipe.distill_tokens(model)
    twin = stock_twin(model)
    plan = distill_budgets(model, recipe, budgets, log, twin)
    device = next(projector.parameters()).device
    paths = [p for item in images for p in getattr(item, "images", (item,))]
    batches = _batches([Path(p) for p in paths], batch_size, seed)
    if not batches:
        raise DataError("distill: no training images")
    signature = inspect.signature(model.get_image_features).parameters
    accepted = None if any(p.kind == p.VAR_KEYWORD for p in signature.values()) else set(signature)

    def load(i: int) -> dict[str, Any]:
        opened = [
            recipe.prepare_image(open_image(p), processor, False) for p in batches[i % len(batches)]
        ]
        return _image_inputs(processor, recipe, opened, device, accepted)

    def compare(inputs: dict[str, Any], n: int, grad: bool) -> tuple[torch.Tensor, float, float]:
        with flexproj.tokens(n):
            with torch.no_grad():
                target = _features(twin, inputs)
            with torch.set_grad_enabled(grad):
                pred = _features(model, inputs)
        return _metrics(*_match(pred, target, n), cosine_weight)

    def probe_all(inputs: dict[str, Any]) -> dict[int, tuple[float, float]]:
        return {n: compare(inputs, n, grad=False)[1:] for n in plan}

    with _fitting(model, twin, projector):
        probe = load(0)
        before = probe_all(probe)
        log(
            f"distill: {steps} steps over budgets {plan} (target: the stock projector's outputs "
            f"pooled to each budget; {tokens} = the stock grid)"
        )
        history, seconds = _fit(
            projector, plan, steps, lr, lambda step, n: compare(load(step), n, grad=True),
            log, progress,
        )  # fmt: skip
        after = probe_all(probe)
    per_budget = {
        str(n): {
            "cosine_before": before[n][1],
            "cosine_after": after[n][1],
            "mse_before": before[n][0],
            "mse_after": after[n][0],
        }
        for n in plan
    }
    for n in plan:
        p = per_budget[str(n)]
        log(
            f"distill N={n}: cosine {p['cosine_before']:.4f} -> {p['cosine_after']:.4f}, "
            f"relative MSE {p['mse_before']:.4g} -> {p['mse_after']:.4g}"
        )
    native = per_budget[str(tokens)]
    return {
        "tokens": tokens,
        "budgets": plan,
        "target": "stock projector outputs average-pooled to each budget on their grid",
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "cosine_weight": cosine_weight,
        "images": sum(len(b) for b in batches),
        **native,
        "per_budget": per_budget,
        "seconds": seconds,
        "history": history,
    }


# ----------------------------------------------------------------------------- standalone

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def image_paths(source: str | Path, image_folder: str | Path | None = None) -> list[Path]:
    """Image files from a directory (recursively, sorted) or a JSON / JSONL list whose items
    are paths or records with ``"image"`` (a path or a list; LLaVA's format; conversations,
    if any, are ignored). Relative paths are taken from ``image_folder`` (default: the
    JSON's folder)."""
    import json

    src = Path(source)
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not src.is_file():
        raise DataError(f"--images {src}: no such file or directory")
    text = src.read_text()
    try:
        if src.suffix.lower() == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"--images {src} is not valid JSON: {exc}") from None
    if not isinstance(items, list):
        raise DataError(f"--images {src}: expected a JSON list of paths or records")
    root = Path(image_folder) if image_folder is not None else src.parent
    out: list[Path] = []
    for i, item in enumerate(items):
        names = item.get("image") if isinstance(item, dict) else item
        names = names if isinstance(names, list) else [names]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise DataError(f"--images {src}, item {i}: no image path ({item!r:.80})")
        out += [root / n for n in names]
    return out


def run_distill(
    model_spec: str,
    images: str | Path,
    output_dir: str | Path,
    *,
    weights: str | None = None,
    image_folder: str | Path | None = None,
    schedule: str = "paper",
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 8,
    cosine_weight: float = 1.0,
    seed: int = 0,
    max_images: int | None = None,
    kernel: str = "auto",
    hidden_dim: int | None = None,
    dtype: str = "float32",
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``flexproj distill``: load ``model_spec`` (``tiny:<family>``, a path or hub id; weights
    from ``weights`` if given), patch a new FlexProjector, distil it at every budget of
    ``schedule`` and the native one, and write it to ``output_dir`` (``flexproj.safetensors``
    + config, loadable by :func:`flexproj.from_pretrained`), with ``distill.json`` (the
    per-budget report) and ``recipe.json`` (so ``flexproj eval --run`` loads it)."""
    import json

    from flexproj.recipes.family import recipe_for_model
    from flexproj.schedule import parse_schedule

    paths = image_paths(images, image_folder)[:max_images]
    if not paths:
        raise DataError(f"--images {images}: no images")
    token_schedule = parse_schedule(schedule, seed=seed)
    recipe = recipe_for_model(model_spec)
    model, processor = recipe.load(model_spec, dtype=dtype, weights=weights)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(target).eval()
    torch.manual_seed(seed)
    flexproj.patch(model, kernel=kernel, hidden_dim=hidden_dim)
    report = distill_projector(
        model,
        processor,
        recipe,
        paths,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        cosine_weight=cosine_weight,
        seed=seed,
        budgets=token_schedule.tokens,
        log=log,
        progress=progress,
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the LLM is untouched: at the native budget the checkpoint runs the stock projector
    flexproj.set_native(model, "stock")
    flexproj.save_pretrained(model, out, schedule=token_schedule.to_dict())
    report = {"model": model_spec, "weights": weights, "images_source": str(images), **report}
    (out / "distill.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = {
        "family": recipe.name,
        "model": model_spec,
        "model_type": model.config.model_type,
        "stage": "distill",
        "schedule": token_schedule.to_dict(),
        "flexproj_version": flexproj.__version__,
        "config": {"weights": weights, "projector": "flex", "kernel": kernel},
        "distill": {k: v for k, v in report.items() if k != "history"},
        "outputs": {"projector": "."},
        "status": "done",
    }
    (out / "recipe.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log(f"saved the distilled projector to {out}")
    return report
