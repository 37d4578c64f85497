"""``flexproj.adaptive_generate``: answer with few vision tokens, re-answer with more only
when unsure.

Every sample is first answered at the smallest budget of the ladder. A sample whose
answer's *confidence* is below the threshold is answered again at the next budget, and
so on up the ladder; confident samples stop where they are. The vision tower runs once
per image for the whole ladder (:func:`flexproj.encoder_cache.vision_cache`): a rung
only re-pools and re-projects the cached tower outputs and re-runs the LLM.

Confidence of an answer: the smallest probability the model gave any token it generated
(up to and including the end-of-sequence token), under the scores ``generate`` returns.
One unsure token makes the answer unsure, which suits short answers (a colour, a count,
a word read off the image); the arithmetic mean would let a long fluent answer hide one
guessed word.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from flexproj._types import Model
from flexproj.budget import budget_value, tokens
from flexproj.encoder_cache import vision_cache
from flexproj.errors import BudgetError, PatchError
from flexproj.state import PatchState, state_of

__all__ = ["AdaptiveOutput", "adaptive_generate", "answer_confidence"]


@dataclass
class AdaptiveOutput:
    """What :func:`adaptive_generate` returns, one entry per sample in input order."""

    #: generated token ids of each sample's final answer (prompt excluded, padding removed)
    sequences: list[torch.Tensor]
    #: the budget that answered each sample
    budgets: list[int]
    #: the confidence of each final answer
    confidences: list[float]
    #: every rung each sample went through: [(budget, confidence), ...]
    history: list[list[tuple[int, float]]] = field(default_factory=list)
    #: vision-tower cache entries computed / answered from the cache over the whole ladder:
    #: one per crop (LLaVA-NeXT/OneVision) or tile (InternVL), one per image for LLaVA-1.5
    #: and Qwen-VL, so a tiled image counts once per tile
    images_encoded: int = 0
    images_reused: int = 0


def answer_confidence(
    scores: Sequence[torch.Tensor], generated: torch.Tensor, stop_ids: Sequence[int]
) -> torch.Tensor:
    """``(B,)`` smallest probability of a chosen token per answer, up to the first stop token.

    ``scores``: one ``(B, V)`` tensor per generated position (``generate(output_scores=True)``);
    ``generated``: ``(B, T)`` the chosen ids.
    """
    logits = torch.stack(list(scores), dim=1).float()  # (B, T, V)
    chosen = logits.log_softmax(-1).gather(-1, generated[..., None])[..., 0].exp()  # (B, T)
    stops = torch.zeros_like(generated, dtype=torch.bool)
    for stop in stop_ids:
        stops |= generated == stop
    # positions after the first stop token are padding: they do not count
    after_stop = (stops.long().cumsum(-1) - stops.long()) > 0
    return chosen.masked_fill(after_stop, 1.0).min(-1).values


def _images_per_sample(processor: Any, texts: Sequence[str]) -> list[int]:
    token = getattr(processor, "image_token", None)
    if not token:
        raise BudgetError(
            f"{type(processor).__name__} has no image_token: pass images as one list per sample"
        )
    return [text.count(token) for text in texts]


def _stop_ids(model: Model, processor: Any) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    pad = getattr(processor.tokenizer, "pad_token_id", None)
    return [*ids, *([pad] if pad is not None else [])]


def _ladder(model: Model, budgets: Any) -> list[int]:
    """The rungs as ints, each checked against the model before anything runs."""
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Iterable):
        raise BudgetError(
            f"budgets must be a sequence of positive ints, smallest first, got {budgets!r}"
        )
    ladder = [budget_value(b) for b in budgets]
    if not ladder or ladder != sorted(set(ladder)):
        raise BudgetError(f"budgets must be distinct and increasing, got {list(budgets)}")
    state = state_of(model)
    if state is None:
        raise PatchError(
            "adaptive_generate needs a model patched by flexproj.patch(model, processor)"
        )
    for rung in ladder:  # a rung above the native count fails now, not when a sample climbs
        state.adapter.check_budget(rung, state.native_tokens)
    return ladder


def adaptive_generate(
    model: Model,
    processor: Any,
    text: str | Sequence[str],
    images: Sequence[Any],
    budgets: Sequence[int] = (64, 144, 256),
    threshold: float = 0.5,
    **generate_kwargs: Any,
) -> AdaptiveOutput:
    """Answer each sample at the smallest budget its answer is confident at.

    Args:
        model: a model patched by :func:`flexproj.patch` (FlexProjector or ``"stock"``).
        processor: its processor, patched with it.
        text: one prompt or a list, with the processor's image placeholders.
        images: the images in processor order (flat), or one list of images per prompt.
        budgets: the ladder, smallest first.
        threshold: an answer whose confidence (module docstring) is below this goes up a rung.
        generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ...); greedy by
            default.
    """
    texts = [text] if isinstance(text, str) else list(text)
    ladder = _ladder(model, budgets)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise BudgetError(
            f"threshold is a probability in [0, 1] (a float), got {threshold!r} "
            f"({type(threshold).__name__})"
        )
    if not 0.0 <= float(threshold) <= 1.0:  # (NaN fails this too)
        raise BudgetError(f"threshold is a probability in [0, 1], got {threshold!r}")
    if images and isinstance(images[0], (list, tuple)):
        per_sample = [list(group) for group in images]
    else:
        counts = _images_per_sample(processor, texts)
        if sum(counts) != len(images):
            raise BudgetError(
                f"the prompts hold {sum(counts)} image placeholders but {len(images)} images "
                "were given"
            )
        flat, per_sample = list(images), []
        for n in counts:
            per_sample.append(flat[:n])
            flat = flat[n:]
    if len(per_sample) != len(texts):
        raise BudgetError(f"{len(texts)} prompts but {len(per_sample)} image groups")

    adapter = cast(PatchState, state_of(model)).adapter  # (patched: checked with the ladder)
    generate_kwargs = {"do_sample": False, **generate_kwargs}
    generate_kwargs.update(output_scores=True, return_dict_in_generate=True)
    device = next(model.parameters()).device
    stop_ids = _stop_ids(model, processor)
    result: list[Any] = [None] * len(texts)
    history: list[list[tuple[int, float]]] = [[] for _ in texts]
    pending = list(range(len(texts)))
    with vision_cache(model) as cache:
        for rung, budget in enumerate(ladder):
            with tokens(budget):
                inputs = processor(
                    text=[texts[i] for i in pending],
                    images=adapter.processor_images([per_sample[i] for i in pending]),
                    return_tensors="pt",
                    padding=True,
                    padding_side="left",
                ).to(device)
                with torch.no_grad():
                    out = model.generate(**inputs, **generate_kwargs)
            generated = out.sequences[:, inputs["input_ids"].shape[1] :]  # (B, T)
            confidence = answer_confidence(out.scores, generated, stop_ids).tolist()
            unsure = []
            for row, (i, conf) in enumerate(zip(pending, confidence, strict=True)):
                history[i].append((budget, conf))
                answer = generated[row]
                keep = ~torch.isin(answer, torch.tensor(stop_ids, device=answer.device))
                result[i] = (answer[keep.cumprod(0).bool()], budget, conf)
                if conf < threshold and rung + 1 < len(ladder):
                    unsure.append(i)
            pending = unsure
            if not pending:
                break
    return AdaptiveOutput(
        sequences=[r[0] for r in result],
        budgets=[r[1] for r in result],
        confidences=[r[2] for r in result],
        history=history,
        images_encoded=cache.computed,
        images_reused=cache.reused,
    )
