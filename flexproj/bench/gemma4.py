"""``flexproj bench gemma4``: Gemma 4's native image budgets against pooling to the same
token count, as ratios from one run.

Gemma 4's processor takes ``max_soft_tokens`` in {70, 140, 280, 560, 1120} per image: it
resizes the image so that its 16 px patches, 3x3-pooled by the tower, give at most that
many soft tokens, so the vision tower's cost follows the budget. flexproj's way is the
other one: encode at one resolution and average-pool the tower's output grid to N. For
each native budget b below ``--encode-budget`` (default 280, Gemma 4's default), on a
randomly initialised Gemma 4 (the real classes and image processor, small widths, one
square image per prompt), in one process with rounds interleaved:

* **native b**: the image processed at ``max_soft_tokens=b``; prefill = tower + LLM;
* **pooled**: the image processed at ``--encode-budget``, its soft-token grid average-pooled
  (``flexproj.pool_grid``) to the same count as native b gives, handed to the model as
  ``mm_encoder_outputs``; prefill = the larger tower + pooling + LLM.

Reported: soft tokens, tower patches, prefill time (median), pooled / native time, and KV
cache bytes after prefill (equal counts, equal bytes). No accuracy: a randomly initialised
model answers nothing, and a Gemma 4 does not train to a meaningful level in minutes here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from flexproj.bench.e2e import kv_cache_bytes
from flexproj.bench.report import (
    add_output_options,
    environment,
    environment_markdown,
    fmt_bytes,
    fmt_ratio,
    markdown_table,
    ratio,
    run_and_write,
    set_threads,
)
from flexproj.errors import BudgetError

__all__ = ["NATIVE_BUDGETS", "add_arguments", "run", "run_gemma4"]

#: the soft-token budgets Gemma 4's image processor accepts (transformers 5.19-5.25)
NATIVE_BUDGETS = (70, 140, 280, 560, 1120)
_VOCAB = 64  # a tiny vocabulary: the prompt is a few text ids around the image
_BOI, _EOI, _IMAGE = _VOCAB - 3, _VOCAB - 2, _VOCAB - 1


def _model(vision_width: int, vision_layers: int, text_width: int, text_layers: int) -> Any:
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    head = 64 if text_width >= 256 else 16
    heads = max(1, text_width // head)
    layers = ["sliding_attention"] * (text_layers - 1) + ["full_attention"]
    text = {
        "vocab_size": _VOCAB, "hidden_size": text_width, "intermediate_size": 4 * text_width,
        "num_hidden_layers": text_layers, "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2), "head_dim": head, "global_head_dim": head,
        "layer_types": layers, "sliding_window": 512, "max_position_embeddings": 8192,
        "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": _VOCAB,
    }  # fmt: skip
    vhead = 64 if vision_width >= 256 else 8
    vision = {
        "hidden_size": vision_width, "intermediate_size": 4 * vision_width,
        "num_hidden_layers": vision_layers, "num_attention_heads": vision_width // vhead,
        "num_key_value_heads": vision_width // vhead, "head_dim": vhead,
    }  # fmt: skip
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None,
        boi_token_id=_BOI, eoi_token_id=_EOI, image_token_id=_IMAGE,
    )  # fmt: skip
    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(config).eval()


def _encode(image: Any, budget: int) -> dict[str, torch.Tensor]:
    """The image at Gemma 4's ``max_soft_tokens=budget``: pixel patches, positions, count."""
    from transformers import Gemma4ImageProcessorPil

    return dict(
        Gemma4ImageProcessorPil(max_soft_tokens=budget)(images=[image], return_tensors="pt")
    )


def _prompt(count: int) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, _BOI, *([_IMAGE] * count), _EOI, 7, 8]])  # (1, L)
    return {"input_ids": ids, "mm_token_type_ids": (ids == _IMAGE).long()}


def _soft_grid(inputs: dict[str, torch.Tensor], kernel: int) -> tuple[int, int]:
    """(rows, cols) of the soft tokens: the image's patch grid / the pooling kernel."""
    positions = inputs["image_position_ids"][0]  # (max_patches, 2) as (x, y), -1 = padding
    real = positions[(positions >= 0).all(-1)]
    return int(real[:, 1].max()) // kernel + 1, int(real[:, 0].max()) // kernel + 1


def _median_seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_gemma4(
    *,
    encode_budget: int,
    side: int,
    repeats: int,
    vision_width: int,
    vision_layers: int,
    text_width: int,
    text_layers: int,
    threads: int | None,
) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from flexproj.pooling import pool_grid

    if encode_budget not in NATIVE_BUDGETS[1:]:
        raise BudgetError(
            f"--encode-budget must be one of Gemma 4's budgets above the smallest, "
            f"{', '.join(map(str, NATIVE_BUDGETS[1:]))}; got {encode_budget}"
        )
    set_threads(threads)
    model = _model(vision_width, vision_layers, text_width, text_layers)
    kernel = int(model.config.vision_config.pooling_kernel_size)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    big = _encode(image, encode_budget)
    big_grid = _soft_grid(big, kernel)
    budgets = [b for b in NATIVE_BUDGETS if b < encode_budget]

    cases: dict[str, Callable[[], Any]] = {}
    facts: dict[str, dict[str, Any]] = {}

    def native_case(inputs: dict[str, torch.Tensor], count: int) -> Callable[[], Any]:
        prompt = _prompt(count)
        pixel = {k: inputs[k] for k in ("pixel_values", "image_position_ids")}
        return lambda: model(**prompt, **pixel, use_cache=True)

    def pooled_case(grid: tuple[int, int]) -> Callable[[], Any]:
        prompt = _prompt(grid[0] * grid[1])

        def prefill() -> Any:
            out = model.model.get_image_features(big["pixel_values"], big["image_position_ids"])
            soft = out.pooler_output[0][None]  # (1, rows*cols, D), row-major
            out.pooler_output = [pool_grid(soft, big_grid, grid)[0]]  # (h*w, D)
            return model(**prompt, mm_encoder_outputs={"image": out}, use_cache=True)

        return prefill

    for b in [*budgets, encode_budget]:
        inputs = _encode(image, b)
        grid = _soft_grid(inputs, kernel)
        count = int(inputs["num_soft_tokens_per_image"][0])
        assert count == grid[0] * grid[1], (count, grid)
        patches = int((inputs["image_position_ids"][0] >= 0).all(-1).sum())
        cases[f"native {b}"] = native_case(inputs, count)
        facts[f"native {b}"] = {"tokens": count, "grid": grid, "tower_patches": patches}
        if b != encode_budget:
            cases[f"pooled {b}"] = pooled_case(grid)
            facts[f"pooled {b}"] = {
                "tokens": count, "grid": grid,
                "tower_patches": int((big["image_position_ids"][0] >= 0).all(-1).sum()),
            }  # fmt: skip

    seconds: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    with torch.no_grad():
        for name in names:  # warm-up, and the KV bytes after one prefill
            facts[name]["kv_bytes"] = kv_cache_bytes(cases[name]().past_key_values)
        for r in range(repeats):  # interleaved, rotating the order
            for name in names[r % len(names) :] + names[: r % len(names)]:
                seconds[name].append(_median_seconds(cases[name]))
    med = {name: statistics.median(values) for name, values in seconds.items()}
    rows = []
    for b in budgets:
        native, pooled = f"native {b}", f"pooled {b}"
        rows.append({
            "budget": b,
            "tokens": facts[native]["tokens"],
            "native_patches": facts[native]["tower_patches"],
            "pooled_patches": facts[pooled]["tower_patches"],
            "native_ms": 1000 * med[native],
            "pooled_ms": 1000 * med[pooled],
            "pooled_over_native_time": ratio(med[pooled], med[native]),
            "native_kv_bytes": facts[native]["kv_bytes"],
            "pooled_kv_bytes": facts[pooled]["kv_bytes"],
        })  # fmt: skip
    top = f"native {encode_budget}"
    return {
        "bench": "gemma4",
        "environment": environment(torch.device("cpu")),
        "config": {
            "encode_budget": encode_budget,
            "image_side": side,
            "repeats": repeats,
            "vision_width": vision_width,
            "vision_layers": vision_layers,
            "text_width": text_width,
            "text_layers": text_layers,
        },
        "encode": {**facts[top], "ms": 1000 * med[top]},
        "rows": rows,
    }


def render(payload: dict[str, Any]) -> str:
    cfg, top = payload["config"], payload["encode"]
    table = markdown_table(
        ["budget b", "soft tokens", "tower patches native / pooled", "prefill ms native",
         "prefill ms pooled", "pooled / native time", "KV bytes native", "KV bytes pooled"],
        [[r["budget"], r["tokens"], f"{r['native_patches']} / {r['pooled_patches']}",
          f"{r['native_ms']:.1f}", f"{r['pooled_ms']:.1f}", fmt_ratio(r["pooled_over_native_time"]),
          fmt_bytes(r["native_kv_bytes"]), fmt_bytes(r["pooled_kv_bytes"])] for r in payload["rows"]],
    )  # fmt: skip
    return (
        f"## flexproj bench gemma4 (one {cfg['image_side']} px square image; pooled from "
        f"max_soft_tokens={cfg['encode_budget']}: {top['tokens']} soft tokens, "
        f"{top['tower_patches']} tower patches, prefill {top['ms']:.1f} ms; vision width "
        f"{cfg['vision_width']} x {cfg['vision_layers']} layers, text width "
        f"{cfg['text_width']} x {cfg['text_layers']} layers; median of {cfg['repeats']} "
        f"interleaved rounds)\n\n{table}\n\n{environment_markdown(payload['environment'])}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encode-budget", type=int, default=280,
                        help="max_soft_tokens the pooled rows encode at (one of 70..1120)")  # fmt: skip
    parser.add_argument("--side", type=int, default=768, help="image side, pixels")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--vision-width", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-width", type=int, default=512)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny widths, 2 rounds (smoke run)")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    quick = bool(args.quick)
    return run_and_write(
        args.out,
        lambda: run_gemma4(
            encode_budget=args.encode_budget,
            side=args.side,
            repeats=2 if quick else args.repeats,
            vision_width=32 if quick else args.vision_width,
            vision_layers=1 if quick else args.vision_layers,
            text_width=64 if quick else args.text_width,
            text_layers=2 if quick else args.text_layers,
            threads=args.threads,
        ),
        render,
    )
