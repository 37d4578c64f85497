"""``flexproj bench budgets``: what per-image and automatic budgets cost, as ratios.

On a LLaVA-1.5-shaped model (real 24x24 CLIP grid, a few LLM layers; ``--quick``: tiny
widths), in one process, rounds interleaved so machine load hits every case alike:

* **mixed**: 8 requests whose budgets spread over the model's range (1/9, 1/4, 4/9 and
  all of the native grid, two each): one ``generate`` over the whole batch with one
  budget per image (``flexproj.tokens([...])``), against the same requests grouped per
  budget (one call per budget) and one at a time. Throughput ratios.
* **overhead**: patched prefill at budget N against the same vision tower, projector and
  LLM called directly (image embeddings scattered into the prompt by hand, no flexproj
  wrapper, guard or processor bookkeeping in the path), as a ratio (goal: within 5%).
* **auto**: ``flexproj.adaptive_generate`` over a ladder against ``generate`` at the
  ladder's largest budget on the same requests, re-answers included (the threshold is
  the median first-rung confidence, so about half the requests escalate).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from flexproj.bench.report import (
    add_output_options,
    environment,
    environment_markdown,
    fmt_ratio,
    markdown_table,
    ratio,
    run_bench,
    set_threads,
)

__all__ = ["add_arguments", "run", "run_budgets"]


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _direct_prefill(model: Any, inputs: dict[str, torch.Tensor], budget: int) -> torch.Tensor:
    """The patched model's prefill by hand: tower, FlexProjector, LLM on the embeddings."""
    import flexproj

    base = model.model
    hidden = base.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    features = hidden[model.config.vision_feature_layer][:, 1:]  # (B, S*S, C), CLS dropped
    side = int(features.shape[1] ** 0.5)
    image = flexproj.get_projector(model)(features, tokens=budget, grid=(side, side))
    embeds = base.get_input_embeddings()(inputs["input_ids"])  # (B, L, D)
    mask = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
    out = base.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    return model.lm_head(out.last_hidden_state[:, -1:])


def run_budgets(
    *, quick: bool, repeats: int, text_layers: int, new_tokens: int, threads: int | None
) -> dict[str, Any]:
    import flexproj
    from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm
    from flexproj.testing.tiny_models import bench_shapes

    set_threads(threads)
    spec = bench_shapes()["llava"]
    overrides = spec.overrides(
        text_hidden=1024, text_layers=text_layers, vision_layers=2, quick=quick
    )
    model: Any
    model, processor = tiny_vlm("llava", **overrides)
    model.eval()
    native = spec.native_budget  # 576: 24x24
    flexproj.patch(model, processor, tokens=native)
    ladder = [native // 9, native // 4, 4 * native // 9, native]  # 64, 144, 256, 576
    budgets = [b for b in ladder for _ in range(2)]
    prompt = f"user : {IMAGE_PLACEHOLDER['llava']} what is in the picture ? assistant :"
    images = tiny_images([spec.image] * len(budgets), seed=0)
    gen = {"max_new_tokens": new_tokens, "do_sample": False, "min_new_tokens": new_tokens}

    def build(indices: list[int], budget: Any) -> dict[str, torch.Tensor]:
        with flexproj.tokens(budget):
            return dict(processor(text=[prompt] * len(indices), images=[images[i] for i in indices],
                                  return_tensors="pt", padding=True, padding_side="left"))  # fmt: skip

    everyone = list(range(len(budgets)))
    mixed = build(everyone, budgets)
    groups = {b: build([i for i in everyone if budgets[i] == b], b) for b in ladder}
    singles = [build([i], budgets[i]) for i in everyone]

    def run_mixed() -> None:
        model.generate(**mixed, **gen)

    def run_grouped() -> None:
        for group in groups.values():
            model.generate(**group, **gen)

    def run_singles() -> None:
        for single in singles:
            model.generate(**single, **gen)

    overhead_budget = ladder[1]
    prefill_inputs = build(everyone[:4], overhead_budget)

    def patched_prefill() -> None:
        model(**prefill_inputs)

    def direct_prefill() -> None:
        _direct_prefill(model, prefill_inputs, overhead_budget)

    auto_prompts = [prompt] * 8
    auto_images = images[:8]
    top = build(list(range(8)), ladder[-1])
    with torch.no_grad():
        probe = flexproj.adaptive_generate(model, processor, text=auto_prompts, images=auto_images,
                                           budgets=ladder[:3], threshold=1.0, **gen)  # fmt: skip
    threshold = statistics.median(h[0][1] for h in probe.history)

    def run_auto() -> None:
        flexproj.adaptive_generate(model, processor, text=auto_prompts, images=auto_images,
                                   budgets=ladder[:3], threshold=threshold, **gen)  # fmt: skip

    def run_top() -> None:
        model.generate(**top, **gen)

    cases = {
        "mixed batch": run_mixed,
        "grouped per budget": run_grouped,
        "one at a time": run_singles,
        "patched prefill": patched_prefill,
        "direct prefill": direct_prefill,
        "auto ladder": run_auto,
        "largest budget": run_top,
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn()
        for r in range(repeats):  # interleaved rounds, rotating the order
            names = list(cases)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                seconds[name].append(_median_seconds(cases[name], 1))
    med = {name: statistics.median(values) for name, values in seconds.items()}
    final = flexproj.adaptive_generate(model, processor, text=auto_prompts, images=auto_images,
                                       budgets=ladder[:3], threshold=threshold, **gen)  # fmt: skip
    flexproj.unpatch(model)
    return {
        "bench": "budgets",
        "environment": environment(torch.device("cpu")),
        "config": {
            "quick": quick,
            "repeats": repeats,
            "text_layers": text_layers,
            "new_tokens": new_tokens,
            "budgets": budgets,
            "ladder": ladder[:3],
            "overhead_budget": overhead_budget,
            "auto_threshold": threshold,
        },
        "seconds": med,
        "ratios": {
            "grouped / mixed (time)": ratio(med["grouped per budget"], med["mixed batch"]),
            "one at a time / mixed (time)": ratio(med["one at a time"], med["mixed batch"]),
            "patched / direct prefill": ratio(med["patched prefill"], med["direct prefill"]),
            "auto / largest budget (time)": ratio(med["auto ladder"], med["largest budget"]),
        },
        "auto_answered_at": final.budgets,
    }


def render(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    rows = [[name, f"{1000 * s:.1f}"] for name, s in payload["seconds"].items()]
    ratios = [[name, fmt_ratio(value)] for name, value in payload["ratios"].items()]
    return (
        f"## flexproj bench budgets (LLaVA-1.5 shape{', quick' if cfg['quick'] else ''}; "
        f"budgets {cfg['budgets']}; {cfg['new_tokens']} new tokens; median of {cfg['repeats']} "
        f"interleaved rounds)\n\n{markdown_table(['case', 'ms'], rows)}\n\n"
        f"{markdown_table(['ratio', 'value'], ratios)}\n\n"
        f"auto ladder {cfg['ladder']} at threshold {cfg['auto_threshold']:.3f}: requests answered "
        f"at {payload['auto_answered_at']}\n\n{environment_markdown(payload['environment'])}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny widths, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--text-layers", type=int, default=2, help="LLM layers (width 1024)")
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens generated per request")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    return run_bench(args, run_budgets, render)
