"""``flexproj bench serve``: vLLM serving throughput and time to first token per budget.

Needs the vLLM plug-in environment (``make install-vllm`` or ``pip install
'flexproj[vllm]'``). Builds a LLaVA-1.5-shaped model offline (real 336 px / patch 14
CLIP grid: 576 native tokens; narrow towers), exports it with ``flexproj export``, starts
one ``vllm.LLM`` engine and, per budget N (``mm_processor_kwargs={"tokens": N}``):

* requests/s: ``--requests`` prompts, each with its own image (no multimodal cache
  hits), ``--new-tokens`` generated, in one ``LLM.generate`` call;
* time to first token: one request generating one token (encoder + prefill).

Each is the median of ``--repeats`` runs; the ratios compare every budget with the
largest one in the same run (same engine, same machine state).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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

DEFAULT_TOKENS = (16, 64, 144, 576)


def _build(root: Path, text_hidden: int) -> Path:
    import flexproj
    from flexproj.serving.export import export
    from flexproj.testing import tiny_vlm

    heads = text_hidden // 32  # vLLM's CPU attention needs head_dim >= 32
    model, processor = tiny_vlm(
        "llava",
        vision_config={"image_size": 336, "patch_size": 14},
        text_config={"hidden_size": text_hidden, "intermediate_size": 2 * text_hidden,
                     "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": 32},
    )  # fmt: skip
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    flexproj.patch(model, processor, tokens=144)
    flexproj.save_pretrained(model, root / "projector")
    return export(root / "base", root / "projector", root / "served", overwrite=True)


def run_serve(
    *, tokens: tuple[int, ...] = DEFAULT_TOKENS, requests: int = 16, new_tokens: int = 8,
    repeats: int = 3, text_hidden: int = 256,
) -> dict[str, Any]:  # fmt: skip
    import torch
    from vllm import LLM, SamplingParams

    from flexproj.testing import tiny_images

    env = environment(torch.device("cpu"), ["fp32"])
    prompt = "USER: <image> what color is the circle ? ASSISTANT:"
    with tempfile.TemporaryDirectory() as tmp:
        served = _build(Path(tmp), text_hidden)
        llm = LLM(model=str(served), enforce_eager=True, dtype="float32", max_model_len=1024,
                  max_num_seqs=requests, kv_cache_memory_bytes=512 * 2**20)  # fmt: skip
        seed = iter(range(10**6))

        def batch(n: int, count: int, max_tokens: int) -> float:
            images = tiny_images([(336, 336)] * count, seed=next(seed))
            reqs = [{"prompt": prompt, "multi_modal_data": {"image": im},
                     "mm_processor_kwargs": {"tokens": n}} for im in images]  # fmt: skip
            params = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens)
            start = time.perf_counter()
            llm.generate(reqs, params, use_tqdm=False)
            return time.perf_counter() - start

        rows: list[dict[str, Any]] = []
        for n in tokens:  # warm-up: every budget once before anything is timed
            batch(n, requests, new_tokens)
        for n in tokens:
            throughput = statistics.median(
                requests / batch(n, requests, new_tokens) for _ in range(repeats)
            )
            ttft = statistics.median(batch(n, 1, 1) for _ in range(repeats))
            rows.append({"tokens": n, "requests_per_s": round(throughput, 3),
                         "ttft_ms": round(ttft * 1e3, 2)})  # fmt: skip
        llm.llm_engine.engine_core.shutdown()
    top = rows[-1]
    for row in rows:
        row["rps_vs_max"] = ratio(row["requests_per_s"], top["requests_per_s"])
        row["ttft_speedup_vs_max"] = ratio(top["ttft_ms"], row["ttft_ms"])
    config = {"requests": requests, "new_tokens": new_tokens, "repeats": repeats,
              "text_hidden": text_hidden, "native_tokens": 576}  # fmt: skip
    return {"environment": env, "config": config, "rows": rows}


def render(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    table = markdown_table(
        ["tokens/image", "requests/s", "x vs max", "TTFT ms", "TTFT speed-up vs max"],
        [[r["tokens"], r["requests_per_s"], fmt_ratio(r["rps_vs_max"]), r["ttft_ms"],
          fmt_ratio(r["ttft_speedup_vs_max"])] for r in payload["rows"]],
    )  # fmt: skip
    return (
        f"## flexproj bench serve (vLLM, LLaVA-1.5 shape, 24x24 grid, LLM width "
        f"{cfg['text_hidden']}, {cfg['requests']} requests x {cfg['new_tokens']} tokens, "
        f"median of {cfg['repeats']})\n\n{table}\n\n{environment_markdown(payload['environment'])}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
    parser.add_argument("--requests", type=int, default=16, help="requests per timed batch")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per budget")
    parser.add_argument("--text-hidden", type=int, default=256, help="LLM width (heads of 32)")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    return run_and_write(
        args.out,
        lambda: run_serve(
            tokens=tuple(sorted(args.tokens)),
            requests=args.requests,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            text_hidden=args.text_hidden,
        ),
        render,
    )
