"""``flexproj bench train``: training steps at a fixed budget vs the TokenFLEX schedule.

Two arms train the same patched model (same seed, same weights, same batches) for the
same number of steps: **fixed** (every step at 256 vision tokens per image) and
**schedule** (each step draws N from {64, 144, 256} with weights 2:3:5 through
:class:`flexproj.schedule.TokenSchedule`, seeded, one N for the whole batch). A step is
forward + backward + AdamW step of the projector and the LLM (vision tower frozen, as
in LLaVA-style stage-2 training). Reported per arm: step times, vision tokens per
step, peak memory; and the schedule's savings against the fixed arm next to what the
paper reports (about 13% less training time, 28% fewer vision tokens).

Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` (reset before the arm). CPU:
``tracemalloc`` does not see torch's allocator, so each arm runs in a fresh spawned
process and reports the growth of its peak resident set (``ru_maxrss`` after the
steps minus ``ru_maxrss`` after building the model and optimizer): the activations,
gradients and AdamW state the steps needed. RSS counts pages, not tensors, so treat
it as an upper bound at MiB resolution. Both arms warm up at their largest budget
(256) before timing, so the peak of any arm that can draw 256 is the 256 peak: the
schedule saves time and tokens, not peak memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flexproj.bench.report import (
    DTYPES,
    add_output_options,
    environment,
    environment_markdown,
    fmt_bytes,
    fmt_ms,
    fmt_ratio,
    markdown_table,
    pick_device,
    run_and_write,
    set_threads,
)
from flexproj.bench.timing import Stopwatch, summarize
from flexproj.errors import ConfigError
from flexproj.registry import supported_models
from flexproj.schedule import PAPER_TOKENS, PAPER_WEIGHTS, TokenSchedule

__all__ = ["add_arguments", "run", "run_train", "sample_budgets"]


def sample_budgets(
    tokens: Sequence[int], weights: Sequence[float], steps: int, seed: int
) -> list[int]:
    """The budget of each step, drawn by :class:`flexproj.schedule.TokenSchedule` (as the
    training recipes draw it)."""
    schedule = TokenSchedule(tuple(tokens), tuple(float(w) for w in weights), seed=seed)
    return [schedule.budget_at(step) for step in range(steps)]


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux: KiB


def run_arm(cfg: dict[str, Any]) -> dict[str, Any]:
    """One arm, start to end (the unit a spawned worker runs). ``cfg`` is plain data."""
    import flexproj
    from flexproj.bench.e2e import bench_prompt, image_token_id
    from flexproj.recipes.family import recipe_for_model_type
    from flexproj.recipes.trainer import set_trainable
    from flexproj.testing import tiny_images, tiny_vlm
    from flexproj.testing.tiny_models import bench_shapes

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    spec = bench_shapes()[cfg["family"]]
    overrides = spec.overrides(
        text_hidden=cfg["text_hidden"],
        text_layers=cfg["text_layers"],
        vision_layers=cfg["vision_layers"],
        quick=cfg["quick"],
    )
    model: Any
    model, processor = tiny_vlm(spec.family, seed=cfg["seed"], **overrides)
    model.to(device).train()
    flexproj.patch(model, processor, tokens=max(cfg["budgets"]))
    # projector + LLM + LM head train, the vision tower stays frozen (the finetune stage)
    params = set_trainable(model, recipe_for_model_type(spec.family), llm=True)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    image_id = image_token_id(model, processor)
    images = tiny_images([spec.image] * cfg["batch"], seed=cfg["seed"])
    prompt = bench_prompt(spec.family, cfg["text_tokens"])

    batches: dict[int, dict[str, torch.Tensor]] = {}
    for n in sorted(set(cfg["budgets"])):
        with flexproj.tokens(n):
            enc = processor(text=[prompt] * cfg["batch"], images=images, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
        labels = inputs["input_ids"].clone()
        labels[labels == image_id] = -100
        inputs["labels"] = labels
        batches[n] = inputs

    amp = cfg["dtype"] != "fp32"
    watch = Stopwatch(device)

    def step(n: int) -> tuple[float, float]:
        inputs = batches[n]
        watch.start()
        with flexproj.tokens(n), torch.autocast(device.type, DTYPES[cfg["dtype"]], enabled=amp):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return watch.stop(), float(loss.detach())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _maxrss_bytes()
    for _ in range(cfg["warmup_steps"]):
        step(max(cfg["budgets"]))
    records = []
    for n in cfg["budgets"]:
        seconds, loss = step(n)
        ids = batches[n]["input_ids"]
        vision = int((ids == image_id).sum())
        records.append(
            {
                "budget": n,
                "step_s": seconds,
                "loss": loss,
                "vision_tokens": vision,
                "tokens": int(ids.numel()),
            }
        )
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        memory = {"method": "cuda max_memory_allocated", "peak_bytes": peak}
    else:
        rss_after = _maxrss_bytes()
        memory = {
            "method": "ru_maxrss growth in a fresh process"
            if cfg["isolated"]
            else "ru_maxrss growth",
            "peak_bytes": rss_after - rss_before,
            "peak_rss_bytes": rss_after,
            "setup_rss_bytes": rss_before,
        }
    text = model.config.text_config
    return {
        "records": records,
        "memory": memory,
        "model": {
            "class": type(model).__name__,
            "text_hidden": text.hidden_size,
            "text_layers": text.num_hidden_layers,
            "vision_layers": cfg["vision_layers"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params),
        },
    }


def _run_isolated(cfg: dict[str, Any]) -> dict[str, Any]:
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(run_arm, cfg).result()


def _summarize_arm(name: str, budgets: Sequence[int], result: dict[str, Any]) -> dict[str, Any]:
    records = result["records"]
    times = [r["step_s"] for r in records]
    vision = [r["vision_tokens"] for r in records]
    counts = {str(n): budgets.count(n) for n in sorted(set(budgets))}
    return {
        "arm": name,
        "steps": len(records),
        "budget_counts": counts,
        "step": summarize(times).to_dict(),
        "mean_step_ms": round(statistics.fmean(times) * 1e3, 3),
        "total_s": round(sum(times), 4),
        "vision_tokens_per_step": round(statistics.fmean(vision), 2),
        "vision_tokens_total": sum(vision),
        "tokens_per_step": round(statistics.fmean(r["tokens"] for r in records), 2),
        "memory": result["memory"],
        "records": records,
    }


def run_train(
    *,
    family: str = "llava",
    fixed: int = 256,
    tokens: Sequence[int] = PAPER_TOKENS,
    weights: Sequence[float] = PAPER_WEIGHTS,
    steps: int = 20,
    warmup_steps: int = 2,
    batch: int = 2,
    text_hidden: int = 2048,
    text_layers: int = 2,
    vision_layers: int = 1,
    text_tokens: int = 96,
    dtype: str = "fp32",
    device: str | None = None,
    quick: bool = False,
    isolate: bool | None = None,
    seed: int = 0,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    set_threads(threads)
    from flexproj.testing.tiny_models import bench_shapes

    shapes = bench_shapes()
    if family not in shapes:
        raise ConfigError(f"unknown family {family!r}; choose from {sorted(shapes)}")
    if len(tokens) != len(weights):
        raise ConfigError(f"{len(tokens)} budgets but {len(weights)} weights")
    dev = pick_device(device)
    env = environment(dev, [dtype])  # at the start: date and load average before the work
    if quick:
        steps, warmup_steps, batch, text_tokens = min(steps, 4), min(warmup_steps, 1), 1, 16
    if isolate is None:
        isolate = dev.type == "cpu"
    arms = {
        f"fixed-{fixed}": [fixed] * steps,
        "schedule " + ":".join(f"{w:g}" for w in weights): sample_budgets(
            tokens, weights, steps, seed
        ),
    }
    base = {
        "family": family,
        "batch": batch,
        "text_hidden": text_hidden,
        "text_layers": text_layers,
        "vision_layers": vision_layers,
        "text_tokens": text_tokens,
        "dtype": dtype,
        "device": str(dev),
        "quick": quick,
        "seed": seed,
        "warmup_steps": warmup_steps,
        "threads": torch.get_num_threads(),
        "isolated": isolate,
    }
    summaries = []
    model_info: dict[str, Any] = {}
    for name, budgets in arms.items():
        log(f"[train] {family} arm {name}: {steps} steps, budgets {budgets}")
        cfg = {**base, "budgets": budgets}
        result = _run_isolated(cfg) if isolate else run_arm(cfg)
        model_info = result["model"]
        summary = _summarize_arm(name, budgets, result)
        log(
            f"  mean step {summary['mean_step_ms']:.1f} ms, vision tokens/step "
            f"{summary['vision_tokens_per_step']}, peak memory {fmt_bytes(result['memory']['peak_bytes'])}"
        )
        summaries.append(summary)
    fixed_arm, sched_arm = summaries
    # per-budget median step time over both arms -> the schedule's expected step time
    per_budget: dict[int, list[float]] = {}
    for arm in summaries:
        for r in arm["records"]:
            per_budget.setdefault(r["budget"], []).append(r["step_s"])
    per_budget_ms = {n: statistics.median(v) * 1e3 for n, v in sorted(per_budget.items())}
    total_w = sum(weights)
    expected_ms = None
    if all(n in per_budget_ms for n in tokens) and fixed in per_budget_ms:
        expected_ms = sum(
            w / total_w * per_budget_ms[n] for n, w in zip(tokens, weights, strict=True)
        )
    expected_tokens = sum(w / total_w * n for n, w in zip(tokens, weights, strict=True))
    comparison = {
        "step_time_ratio": round(sched_arm["mean_step_ms"] / fixed_arm["mean_step_ms"], 4),
        "total_time_ratio": round(sched_arm["total_s"] / fixed_arm["total_s"], 4),
        "vision_tokens_ratio": round(
            sched_arm["vision_tokens_total"] / max(fixed_arm["vision_tokens_total"], 1), 4
        ),
        "expected_vision_tokens_ratio": round(expected_tokens / fixed, 4),
        "expected_step_time_ratio": (
            round(expected_ms / per_budget_ms[fixed], 4) if expected_ms is not None else None
        ),
        "peak_memory_ratio": round(
            sched_arm["memory"]["peak_bytes"] / max(fixed_arm["memory"]["peak_bytes"], 1), 4
        ),
        "paper": {"training_time_reduction": 0.13, "vision_token_reduction": 0.28},
    }
    return {
        "bench": "train",
        "environment": env,
        "config": {
            **base,
            "steps": steps,
            "fixed": fixed,
            "tokens": list(tokens),
            "weights": list(weights),
        },
        "model": model_info,
        "arms": summaries,
        "per_budget_step_ms": {str(n): round(v, 3) for n, v in per_budget_ms.items()},
        "comparison": comparison,
    }


def to_markdown(payload: dict[str, Any]) -> str:
    cfg, m, c = payload["config"], payload["model"], payload["comparison"]
    parts = [
        "## flexproj bench train",
        "",
        environment_markdown(payload["environment"]),
        f"- {cfg['family']}: {m['class']}, LLM {m['text_layers']} x {m['text_hidden']}, "
        f"{m['vision_layers']} vision layer(s) (frozen); {m['parameters'] / 1e6:.0f} M parameters, "
        f"{m['trainable'] / 1e6:.0f} M trainable (projector + LLM), AdamW",
        f"- batch {cfg['batch']} images, ~{cfg['text_tokens']} text tokens each, "
        f"{cfg['steps']} timed steps per arm after {cfg['warmup_steps']} warm-up step(s) at the "
        f"largest budget, dtype {cfg['dtype']}, seed {cfg['seed']}",
        "",
    ]
    rows = []
    for arm in payload["arms"]:
        rows.append(
            [
                arm["arm"],
                arm["steps"],
                ", ".join(f"{k}: {v}" for k, v in arm["budget_counts"].items()),
                fmt_ms(arm["step"]["median_ms"], arm["step"]["iqr_ms"]),
                fmt_ms(arm["mean_step_ms"]),
                f"{arm['total_s']:.2f}",
                f"{arm['vision_tokens_per_step']:.1f}",
                f"{arm['tokens_per_step']:.1f}",
                fmt_bytes(arm["memory"]["peak_bytes"]),
            ]
        )
    parts.append(
        markdown_table(
            [
                "arm",
                "steps",
                "budgets drawn",
                "step ms (median)",
                "mean step ms",
                "total s",
                "vision tok/step",
                "all tok/step",
                "peak memory",
            ],
            rows,
        )
    )
    parts += [
        "",
        f"Peak memory: {payload['arms'][0]['memory']['method']}.",
        "",
        "Median step time per budget (both arms): "
        + ", ".join(f"N={k}: {fmt_ms(v)} ms" for k, v in payload["per_budget_step_ms"].items()),
        "",
        markdown_table(
            ["schedule / fixed", "measured", "expected from the weights", "paper"],
            [
                [
                    "training time",
                    fmt_ratio(c["total_time_ratio"]),
                    fmt_ratio(c["expected_step_time_ratio"]),
                    "0.87 (-13%)",
                ],
                [
                    "vision tokens",
                    fmt_ratio(c["vision_tokens_ratio"]),
                    fmt_ratio(c["expected_vision_tokens_ratio"]),
                    "0.72 (-28%)",
                ],
                ["peak memory", fmt_ratio(c["peak_memory_ratio"]), "1.00", "-"],
            ],
        ),
        "",
    ]
    return "\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="llava", choices=supported_models())
    parser.add_argument("--fixed", type=int, default=256, help="budget of the fixed arm")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(PAPER_TOKENS))
    parser.add_argument("--weights", nargs="+", type=float, default=list(PAPER_WEIGHTS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--text-hidden", type=int, default=2048)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=96, help="text tokens per sample")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="fp32, or autocast to bf16/fp16 (weights stay fp32)",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each arm in a fresh process (default: on CPU, for peak memory)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny widths, 4 steps: seconds")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    return run_and_write(
        args.out,
        lambda: run_train(
            family=args.family,
            fixed=args.fixed,
            tokens=args.tokens,
            weights=args.weights,
            steps=args.steps,
            warmup_steps=args.warmup_steps,
            batch=args.batch,
            text_hidden=args.text_hidden,
            text_layers=args.text_layers,
            vision_layers=args.vision_layers,
            text_tokens=args.text_tokens,
            dtype=args.dtype,
            device=args.device,
            quick=args.quick,
            isolate=args.isolate,
            seed=args.seed,
            threads=args.threads,
        ),
        to_markdown,
    )
