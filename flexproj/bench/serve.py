"""``flexproj bench serve --family F``: vLLM serving throughput and time to first token per
budget, against the native budget (the stock model's token count).

Needs the vLLM plug-in environment (``make install-vllm`` or ``pip install
'flexproj[vllm]'``). Builds a model of family F offline at a real vision geometry (narrow
towers: vision width 32, LLM width ``--text-hidden`` in heads of 32, 2 layers; see
:data:`SHAPES`), exports it with ``flexproj export``, starts one ``vllm.LLM`` engine and,
per budget N (``mm_processor_kwargs={"tokens": N}``; the last default budget is the
family's native count, the token count the stock model spends):

* requests/s: ``--requests`` prompts, each with its own image (no multimodal cache
  hits), ``--new-tokens`` generated, in one ``LLM.generate`` call;
* time to first token: one request generating one token (encoder + prefill).

Each is the median of ``--repeats`` runs after one warm-up; the ratios compare every row
with the native row of the same run. The stock class itself is not timed: vLLM 0.32's
stock LLaVA cannot load a checkpoint saved by transformers 5 (``vision_tower.embeddings``
where it wants ``vision_tower.vision_model.embeddings``; the flexproj classes map the keys),
and at the native count the two differ only in the projector (an MLP vs LayerNorm + SwiGLU
on the same tokens).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexproj.bench.report import (
    add_output_options,
    environment,
    environment_markdown,
    fmt_ratio,
    markdown_table,
    ratio,
    run_and_write,
)

MAX_LEN = 4096  # NeXT / OneVision stock: 3 crops of 576 plus newlines, ~2000 tokens
_NEXT_PINPOINTS = [[336, 336], [336, 672], [672, 336], [672, 672]]


@dataclass(frozen=True)
class ServeShape:
    """The bench model of one family: ``tiny_vlm`` overrides and the request images."""

    overrides: dict[str, Any]
    image: tuple[int, int]  # (width, height) of every request image
    tokens: tuple[int, ...]  # default budgets
    native: str  # the native count (the stock model's), in words
    text: dict[str, Any] = field(default_factory=dict)


_CLIP_336 = {"vision_config": {"image_size": 336, "patch_size": 14}}
_QWEN = {"image_processor": {"max_pixels": 336 * 336, "min_pixels": 16 * 16}}
SHAPES: dict[str, ServeShape] = {
    "llava": ServeShape(_CLIP_336, (336, 336), (16, 64, 144, 576), "576 per image"),
    "llava_siglip": ServeShape(_CLIP_336, (336, 336), (16, 64, 144, 576), "576 per image"),
    "llava_next": ServeShape(
        {**_CLIP_336, "image_grid_pinpoints": _NEXT_PINPOINTS},
        (672, 336), (16, 64, 144, 576), "576 per crop, 3 crops + newlines",
    ),
    "llava_onevision": ServeShape(
        {**_CLIP_336, "image_grid_pinpoints": _NEXT_PINPOINTS},
        (672, 336), (16, 64, 144, 576), "576 per crop, 3 crops + newlines",
    ),
    "qwen2_vl": ServeShape(_QWEN, (336, 336), (16, 64, 144, 441), "441 per image (21x21)"),
    "qwen2_5_vl": ServeShape(_QWEN, (336, 336), (16, 64, 144, 441), "441 per image (21x21)"),
}  # fmt: skip


def _build(family: str, root: Path, text_hidden: int) -> tuple[Path, str]:
    """``(exported directory, one image's prompt placeholder)``."""
    import flexproj
    from flexproj.serving.export import export
    from flexproj.testing import tiny_vlm
    from flexproj.testing.tiny_models import tiny_spec

    heads = text_hidden // 32  # vLLM's CPU attention needs head_dim >= 32
    text = {"hidden_size": text_hidden, "intermediate_size": 2 * text_hidden,
            "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": 32,
            "max_position_embeddings": MAX_LEN}  # fmt: skip
    model, processor = tiny_vlm(family, text_config=text, **SHAPES[family].overrides)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    flexproj.patch(model, processor, tokens=64)
    flexproj.save_pretrained(model, root / "projector")
    served = export(root / "base", root / "projector", root / "served", overwrite=True)
    return served, tiny_spec(family).placeholder


def _measure(
    model_dir: Path, prompt: str, image: tuple[int, int], budgets: list[int | None],
    requests: int, new_tokens: int, repeats: int,
) -> list[tuple[float, float]]:  # fmt: skip
    """``(requests/s, TTFT s)`` per budget (None: no budget kwarg) on one engine."""
    from vllm import LLM, SamplingParams

    from flexproj.testing import tiny_images

    llm = LLM(model=str(model_dir), enforce_eager=True, dtype="float32", max_model_len=MAX_LEN,
              max_num_seqs=requests, kv_cache_memory_bytes=512 * 2**20,
              limit_mm_per_prompt={"image": 1})  # fmt: skip
    seed = iter(range(10**6))

    def batch(n: int | None, count: int, max_tokens: int) -> float:
        images = tiny_images([image] * count, seed=next(seed))
        reqs: list[Any] = [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images]
        if n is not None:
            for req in reqs:
                req["mm_processor_kwargs"] = {"tokens": n}
        params = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens)
        start = time.perf_counter()
        llm.generate(reqs, params, use_tqdm=False)
        return time.perf_counter() - start

    try:
        for n in budgets:  # warm-up: every budget once before anything is timed
            batch(n, requests, new_tokens)
        out = []
        for n in budgets:
            rps = statistics.median(
                requests / batch(n, requests, new_tokens) for _ in range(repeats)
            )
            ttft = statistics.median(batch(n, 1, 1) for _ in range(repeats))
            out.append((rps, ttft))
        return out
    finally:
        llm.llm_engine.engine_core.shutdown()


def run_serve(
    *, family: str = "llava", tokens: tuple[int, ...] | None = None, requests: int = 16,
    new_tokens: int = 8, repeats: int = 3, text_hidden: int = 256,
) -> dict[str, Any]:  # fmt: skip
    import torch

    shape = SHAPES[family]
    budgets = list(tokens or shape.tokens)
    env = environment(torch.device("cpu"), ["fp32"])
    with tempfile.TemporaryDirectory() as tmp:
        served, placeholder = _build(family, Path(tmp), text_hidden)
        prompt = f"{placeholder} what color is the circle ?"
        flex = _measure(served, prompt, shape.image, list(budgets), requests, new_tokens, repeats)
    rows: list[dict[str, Any]] = []
    base = flex[-1]  # the native budget: the stock model's token count
    for label, (rps, ttft) in zip(budgets, flex, strict=True):
        rows.append({"tokens": label, "requests_per_s": round(rps, 3),
                     "ttft_ms": round(ttft * 1e3, 2),
                     "rps_vs_native": ratio(round(rps, 3), round(base[0], 3)),
                     "ttft_speedup_vs_native": ratio(round(base[1] * 1e3, 2), round(ttft * 1e3, 2))})  # fmt: skip
    config = {"family": family, "requests": requests, "new_tokens": new_tokens,
              "repeats": repeats, "text_hidden": text_hidden, "image": list(shape.image),
              "native": shape.native}  # fmt: skip
    return {"environment": env, "config": config, "rows": rows}


def render(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    table = markdown_table(
        ["tokens", "requests/s", "x vs native", "TTFT ms", "TTFT speed-up vs native"],
        [[r["tokens"], r["requests_per_s"], fmt_ratio(r["rps_vs_native"]), r["ttft_ms"],
          fmt_ratio(r["ttft_speedup_vs_native"])] for r in payload["rows"]],
    )  # fmt: skip
    w, h = cfg["image"]
    return (
        f"## flexproj bench serve --family {cfg['family']} (vLLM; {w}x{h} images, native: "
        f"{cfg['native']}; LLM width {cfg['text_hidden']}, {cfg['requests']} requests x "
        f"{cfg['new_tokens']} tokens, median of {cfg['repeats']})\n\n{table}\n\n"
        f"{environment_markdown(payload['environment'])}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=sorted(SHAPES), default="llava")
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="budgets; ratios are against the largest (default: the family's, up to native)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=16, help="requests per timed batch")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per budget")
    parser.add_argument("--text-hidden", type=int, default=256, help="LLM width (heads of 32)")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    compute: Callable[[], dict[str, Any]] = lambda: run_serve(  # noqa: E731
        family=args.family,
        tokens=tuple(sorted(args.tokens)) if args.tokens else None,
        requests=args.requests,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        text_hidden=args.text_hidden,
    )
    return run_and_write(args.out, compute, render)
