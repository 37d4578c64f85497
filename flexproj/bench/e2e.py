"""``flexproj bench e2e``: prefill, decode and KV cache per token budget, per family.

Each family is a real transformers model built offline by
:func:`flexproj.testing.tiny_vlm` at **realistic widths and real patch grids but few
layers** (default: one vision layer, two LLM layers), so it runs on a CPU while the
token counts, projector shapes and per-token KV sizes are those of the real models.
Its stock model is timed first, then the same weights patched by
:func:`flexproj.patch`, at the native budget (the stock token count) and at each
smaller budget.

One ``generate`` call (greedy, ``decode_tokens + 1`` new tokens) is one sample: a
logits processor stamps the time at every step, so prefill is the time to the first
logits (vision tower + projector + LLM prefill) and each later interval is one decode
step. KV-cache bytes are counted from the ``past_key_values`` that ``generate``
returns (the prompt positions of every key and value tensor). Vision time (tower +
projector alone) is timed separately through ``get_image_features``.

The ideal prefill ratio is the token-count ratio (prompt length at N / stock prompt
length); the vision tower's cost does not shrink with N, so measured ratios sit above
it, and decode per token barely moves at batch 1 (it reads the weights, not the cache).
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from flexproj.bench.report import (
    add_output_options,
    environment,
    environment_markdown,
    fmt_bytes,
    fmt_ms,
    fmt_ratio,
    markdown_table,
    pick_device,
    ratio,
    run_bench,
    set_threads,
)
from flexproj.bench.timing import Stopwatch, summarize
from flexproj.errors import ConfigError
from flexproj.registry import supported_models

if TYPE_CHECKING:
    from flexproj.testing.tiny_models import BenchShape

__all__ = [
    "add_arguments",
    "bench_prompt",
    "image_token_id",
    "kv_cache_bytes",
    "run",
    "run_e2e",
]

DEFAULT_TOKENS = (64, 144, 256)


_FILLER = "describe the picture in one short word please . what is in the image ?".split()


def bench_prompt(family: str, text_tokens: int) -> str:
    """A one-image prompt of about ``text_tokens`` text tokens for tiny variant ``family``."""
    from flexproj.testing import tiny_spec

    words = [_FILLER[i % len(_FILLER)] for i in range(max(0, text_tokens - 4))]
    return f"user : {tiny_spec(family).placeholder} {' '.join(words)} assistant :"


def kv_cache_bytes(cache: Any, positions: int | None = None) -> int:
    """Bytes of every key/value tensor in ``cache`` (a transformers ``Cache`` or legacy
    tuples); with ``positions``, only the first ``positions`` sequence positions."""
    total = 0
    for t in _cache_tensors(cache):
        if positions is None or t.dim() < 2:
            total += t.numel() * t.element_size()
        else:
            seq = t.shape[-2]
            total += t.numel() // max(seq, 1) * min(seq, positions) * t.element_size()
    return total


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    if isinstance(cache, torch.Tensor):
        return [cache] if cache.numel() else []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        out = []
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.numel():
                    out.append(t)
        return out
    if isinstance(cache, (tuple, list)):
        return [t for item in cache for t in _cache_tensors(item)]
    for name in ("self_attention_cache", "key_cache"):  # older / encoder-decoder caches
        inner = getattr(cache, name, None)
        if inner is not None:
            return _cache_tensors(inner) + _cache_tensors(getattr(cache, "value_cache", ()))
    return []


def _stamp_processor(watch: Stopwatch, stamps: list[float]) -> Any:
    from transformers import LogitsProcessor

    class Stamp(LogitsProcessor):
        """Records the time at each generation step (after that step's forward)."""

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
            stamps.append(watch.lap())
            return scores

    return Stamp()


@dataclass
class _Samples:
    """Per-variant samples collected across round-robin rounds (seconds)."""

    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    vision: list[float] = field(default_factory=list)
    first_prefill: float | None = None
    first_vision: float | None = None
    cache: Any = None
    generated: int = 0


def _generate_once(
    model: Any, inputs: dict[str, torch.Tensor], decode_tokens: int, watch: Stopwatch
) -> tuple[list[float], Any]:
    """One greedy ``generate``: ``[prefill, decode step, ...]`` seconds, and its output."""
    from transformers import LogitsProcessorList

    stamps: list[float] = []
    processors = LogitsProcessorList([_stamp_processor(watch, stamps)])
    watch.start()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=decode_tokens + 1,
            min_new_tokens=decode_tokens + 1,
            do_sample=False,
            use_cache=True,
            return_dict_in_generate=True,
            logits_processor=processors,
        )
    return stamps, out


def _vision_once(model: Any, inputs: dict[str, torch.Tensor], watch: Stopwatch) -> float:
    """``get_image_features`` alone (vision tower + projector), with the kwargs that
    ``generate`` would pass (chosen by signature)."""
    fn = model.model.get_image_features
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in inputs.items() if k in params}
    watch.start()
    with torch.inference_mode():
        fn(**kwargs)
    return watch.stop()


def image_token_id(model: Any, processor: Any) -> int:
    """The id of the image placeholder token (processor first, then the config)."""
    for source in (processor, model.config):
        value = getattr(source, "image_token_id", None)
        if isinstance(value, int):
            return value
    return int(model.config.image_token_index)


def _variants(spec: BenchShape, tokens: Sequence[int]) -> list[tuple[str, int | None]]:
    """``(label, budget)`` of each timed variant: the stock model (budget None), then the
    native budget and each of ``tokens`` the grid can serve."""
    variants: list[tuple[str, int | None]] = [("stock", None)]
    variants += [(f"N={n}", n) for n in [spec.native_budget, *tokens] if n <= spec.native_budget]
    return list(dict.fromkeys(variants))  # native budget may also be in tokens


def _time_variants(
    model: Any,
    variants: Sequence[tuple[str, int | None]],
    inputs: dict[str, dict[str, torch.Tensor]],
    *,
    decode_tokens: int,
    warmup: int,
    repeats: int,
    device: torch.device,
) -> dict[str, _Samples]:
    """Every variant gets one vision call and one generate call per round, rounds rotating
    the order, so drifting machine load hits all alike. The stock variant runs inside
    ``flexproj.disabled(model)`` (no unpatching)."""
    import contextlib

    import flexproj

    def variant(budget: int | None) -> contextlib.AbstractContextManager[Any]:
        return flexproj.disabled(model) if budget is None else flexproj.tokens(budget)

    samples = {label: _Samples() for label, _ in variants}
    watch = Stopwatch(device)
    for r in range(max(1, warmup) + repeats):
        shift = r % len(variants)
        for label, budget in [*variants[shift:], *variants[:shift]]:
            acc = samples[label]
            with variant(budget):
                vision_s = _vision_once(model, inputs[label], watch)
                stamps, out = _generate_once(model, inputs[label], decode_tokens, watch)
            if r == 0:
                acc.first_vision, acc.first_prefill = vision_s, stamps[0]
                continue
            acc.vision.append(vision_s)
            acc.prefill.append(stamps[0])
            acc.decode.extend(stamps[1:])
            acc.cache = out.past_key_values
            acc.generated = int(out.sequences.shape[1] - inputs[label]["input_ids"].shape[1])
    return samples


def _variant_row(
    family: str,
    label: str,
    budget: int | None,
    acc: _Samples,
    ids: torch.Tensor,
    image_id: int,
    warmup: int,
) -> dict[str, Any]:
    """One variant's timings, token counts and KV-cache bytes (``ids``: its input ids)."""
    vision_tokens = int((ids[0] == image_id).sum())
    prompt_len = int(ids.shape[1])
    return {
        "family": family,
        "variant": label,
        "budget": budget,
        "vision_tokens": vision_tokens,
        "prompt_tokens": prompt_len,
        "text_tokens": prompt_len - vision_tokens,
        "batch": int(ids.shape[0]),
        "vision": summarize(acc.vision, warmup=warmup, first_s=acc.first_vision).to_dict(),
        "prefill": summarize(acc.prefill, warmup=warmup, first_s=acc.first_prefill).to_dict(),
        "decode_per_token": summarize(acc.decode).to_dict() if acc.decode else None,
        "kv_bytes": kv_cache_bytes(acc.cache, prompt_len),
        "kv_bytes_final": kv_cache_bytes(acc.cache),
        "generated": acc.generated,
    }


def _add_stock_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """Each row's ratios to the stock row (the first)."""
    stock = rows[0]
    for row in rows:
        row["ratios"] = {
            "ideal_prefill": round(row["prompt_tokens"] / stock["prompt_tokens"], 4),
            "vision_tokens": round(row["vision_tokens"] / max(stock["vision_tokens"], 1), 4),
            "prefill": ratio(row["prefill"]["median_ms"], stock["prefill"]["median_ms"]),
            "llm_prefill": ratio(
                row["prefill"]["median_ms"] - row["vision"]["median_ms"],
                stock["prefill"]["median_ms"] - stock["vision"]["median_ms"],
            ),
            "decode_per_token": ratio(
                (row["decode_per_token"] or {}).get("median_ms"),
                (stock["decode_per_token"] or {}).get("median_ms"),
            ),
            "kv_bytes": round(row["kv_bytes"] / max(stock["kv_bytes"], 1), 4),
        }


def _model_summary(model: Any, spec: BenchShape, vision_layers: int) -> dict[str, Any]:
    text = model.config.text_config
    return {
        "class": type(model).__name__,
        "text_hidden": text.hidden_size,
        "text_layers": text.num_hidden_layers,
        "text_heads": text.num_attention_heads,
        "text_kv_heads": getattr(text, "num_key_value_heads", None),
        "vision_layers": vision_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "image": list(spec.image),
        "native_budget": spec.native_budget,
    }


def _bench_family(
    spec: BenchShape,
    *,
    tokens: Sequence[int],
    text_hidden: int,
    text_layers: int,
    vision_layers: int,
    text_tokens: int,
    batch: int,
    decode_tokens: int,
    warmup: int,
    repeats: int,
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    import flexproj
    from flexproj.testing import tiny_images, tiny_vlm

    overrides = spec.overrides(
        text_hidden=text_hidden, text_layers=text_layers, vision_layers=vision_layers, quick=quick
    )
    model: Any
    model, processor = tiny_vlm(spec.family, **overrides)
    model.to(device=device, dtype=dtype).eval()
    image_id = image_token_id(model, processor)
    images = tiny_images([spec.image] * batch, seed=0)
    prompt = bench_prompt(spec.family, text_tokens)

    def build_inputs() -> dict[str, torch.Tensor]:
        batch_inputs = processor(text=[prompt] * batch, images=images, return_tensors="pt")
        return {
            k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for k, v in batch_inputs.items()
            if isinstance(v, torch.Tensor)
        }

    # the inputs of each variant are built once, up front
    variants = _variants(spec, tokens)
    inputs: dict[str, dict[str, torch.Tensor]] = {"stock": build_inputs()}
    flexproj.patch(model, processor, tokens=spec.native_budget)
    for label, budget in variants[1:]:
        assert budget is not None
        with flexproj.tokens(budget):
            inputs[label] = build_inputs()
    try:
        samples = _time_variants(
            model, variants, inputs, decode_tokens=decode_tokens, warmup=warmup,
            repeats=repeats, device=device,
        )  # fmt: skip
    finally:
        flexproj.unpatch(model)

    rows = []
    for label, budget in variants:
        row = _variant_row(
            spec.family, label, budget, samples[label], inputs[label]["input_ids"], image_id, warmup
        )
        dec = row["decode_per_token"]
        log(
            f"  {spec.family:<16} {label:<7} vision tokens {row['vision_tokens']:>5}  prompt "
            f"{row['prompt_tokens']:>5}  prefill {row['prefill']['median_ms']:9.1f} ms  decode "
            f"{dec['median_ms'] if dec else float('nan'):7.2f} ms/token  KV {row['kv_bytes']:>11} B"
        )
        rows.append(row)
    _add_stock_ratios(rows)
    return {
        "family": spec.family,
        "note": spec.note,
        "model": _model_summary(model, spec, vision_layers),
        "rows": rows,
    }


def to_markdown(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    parts = [
        "## flexproj bench e2e",
        "",
        environment_markdown(payload["environment"]),
        f"- dtype {cfg['dtype']}, batch {cfg['batch']}, ~{cfg['text_tokens']} text tokens, "
        f"{cfg['decode_tokens']} decode steps per sample, warm-up {cfg['warmup']}, repeats "
        f"{cfg['repeats']}; times are medians ±IQR in ms",
        "- prefill = time to the first logits of `generate` (vision tower + projector + LLM "
        "prefill); vision = `get_image_features` alone; ideal = prompt-length ratio vs stock",
        "",
    ]
    for fam in payload["families"]:
        if "error" in fam:
            parts += [f"### {fam['family']}", "", f"not run: {fam['error']}", ""]
            continue
        m = fam["model"]
        parts += [
            f"### {fam['family']}",
            "",
            f"{fam['note']}. {m['class']}, LLM {m['text_layers']} layers x {m['text_hidden']} "
            f"({m['text_heads']} heads, {m['text_kv_heads']} KV heads), {m['vision_layers']} "
            f"vision layer(s), {m['parameters'] / 1e6:.0f} M parameters.",
            "",
        ]
        table = []
        for row in fam["rows"]:
            r = row["ratios"]
            dec = row["decode_per_token"] or {}
            table.append(
                [
                    row["variant"],
                    row["vision_tokens"],
                    row["prompt_tokens"],
                    fmt_ms(row["prefill"]["median_ms"], row["prefill"]["iqr_ms"]),
                    fmt_ratio(r["prefill"]),
                    fmt_ratio(r["ideal_prefill"]),
                    fmt_ms(row["vision"]["median_ms"]),
                    fmt_ratio(r["llm_prefill"]),
                    fmt_ms(dec.get("median_ms"), dec.get("iqr_ms")),
                    fmt_ratio(r["decode_per_token"]),
                    fmt_bytes(row["kv_bytes"]),
                    fmt_ratio(r["kv_bytes"]),
                ]
            )
        parts.append(
            markdown_table(
                [
                    "variant",
                    "vision tok",
                    "prompt tok",
                    "prefill ms",
                    "×stock",
                    "ideal",
                    "vision ms",
                    "LLM part ×stock",
                    "decode ms/tok",
                    "×stock",
                    "KV cache",
                    "×stock",
                ],
                table,
            )
        )
        parts.append("")
    headline = payload.get("headline")
    if headline:
        parts += ["### Headline: prefill speed-up at 64 tokens", ""]
        parts += [
            f"- {h['family']}: prefill speed-up {h['speedup_vs_stock']:.2f}x vs stock "
            f"({h['stock_vision_tokens']} vision tokens), {h['speedup_vs_native_budget']:.2f}x vs "
            f"the patched model at its native budget; ideal {h['ideal']:.2f}x"
            for h in headline
        ]
        parts.append("")
    return "\n".join(parts)


def run_e2e(
    *,
    families: Sequence[str] | None = None,
    tokens: Sequence[int] = DEFAULT_TOKENS,
    text_hidden: int = 2048,
    text_layers: int = 2,
    vision_layers: int = 1,
    text_tokens: int = 48,
    batch: int = 1,
    decode_tokens: int = 16,
    dtype: str = "fp32",
    device: str | None = None,
    quick: bool = False,
    warmup: int | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    set_threads(threads)
    import flexproj
    from flexproj.bench.report import DTYPES

    dev = pick_device(device)
    env = environment(dev, [dtype])  # at the start: date and load average before the work
    registered = flexproj.supported_models()
    if families is None:
        families = ["llava"] if quick else registered
    unknown = [f for f in families if f not in registered]
    if unknown:
        raise ConfigError(f"unknown family {unknown}; choose from {registered}")
    from flexproj.testing.tiny_models import bench_shapes

    shapes = bench_shapes()
    if quick:
        decode_tokens = min(decode_tokens, 4)
    warmup = 1 if warmup is None else warmup
    repeats = (1 if quick else 3) if repeats is None else repeats
    torch_dtype = DTYPES[dtype]
    results: list[dict[str, Any]] = []
    for family in families:
        spec = shapes.get(family)
        if spec is None:
            results.append(
                {"family": family, "error": f"the {family!r} family declares no bench shape here"}
            )
            continue
        log(f"[e2e] {family}")
        torch.manual_seed(0)
        try:
            results.append(
                _bench_family(
                    spec,
                    tokens=tokens,
                    text_hidden=text_hidden,
                    text_layers=text_layers,
                    vision_layers=vision_layers,
                    text_tokens=text_tokens,
                    batch=batch,
                    decode_tokens=decode_tokens,
                    warmup=warmup,
                    repeats=repeats,
                    dtype=torch_dtype,
                    device=dev,
                    quick=quick,
                    log=log,
                )
            )
        except Exception as exc:  # one family failing must not hide the others
            log(f"  {family} failed: {type(exc).__name__}: {exc}")
            results.append({"family": family, "error": f"{type(exc).__name__}: {exc}"})
    headline = []
    for fam in results:
        rows = {r["budget"]: r for r in fam.get("rows", [])}
        stock = rows.get(None)
        at64 = rows.get(64)
        shape = shapes.get(fam["family"])
        native = rows.get(shape.native_budget) if shape is not None else None
        if stock and at64 and native:
            headline.append(
                {
                    "family": fam["family"],
                    "stock_vision_tokens": stock["vision_tokens"],
                    "speedup_vs_stock": stock["prefill"]["median_ms"]
                    / at64["prefill"]["median_ms"],
                    "speedup_vs_native_budget": native["prefill"]["median_ms"]
                    / at64["prefill"]["median_ms"],
                    "ideal": stock["prompt_tokens"] / at64["prompt_tokens"],
                }
            )
    return {
        "bench": "e2e",
        "environment": env,
        "config": {
            "families": list(families),
            "tokens": list(tokens),
            "text_hidden": 64 if quick else text_hidden,
            "text_layers": text_layers,
            "vision_layers": vision_layers,
            "text_tokens": text_tokens,
            "batch": batch,
            "decode_tokens": decode_tokens,
            "dtype": dtype,
            "quick": quick,
            "warmup": warmup,
            "repeats": repeats,
        },
        "families": results,
        "headline": headline,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--families",
        nargs="+",
        default=None,
        choices=supported_models(),
        help="model families (default: every one with a registered adapter; --quick: llava)",
    )
    parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
    parser.add_argument("--text-hidden", type=int, default=2048, help="LLM width (default 2048)")
    parser.add_argument("--text-layers", type=int, default=2, help="LLM layers (default 2)")
    parser.add_argument("--vision-layers", type=int, default=1, help="vision layers (default 1)")
    parser.add_argument("--text-tokens", type=int, default=48, help="text tokens per prompt")
    parser.add_argument("--batch", type=int, default=1, help="prompts per generate call")
    parser.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if any)")
    parser.add_argument("--quick", action="store_true", help="tiny widths, real grids: seconds")
    parser.add_argument("--warmup", type=int, default=None, help="untimed samples (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples (default 3)")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    return run_bench(
        args, run_e2e, to_markdown, ok=lambda p: all("error" not in f for f in p["families"])
    )
