"""``flexproj bench``: the timer, the report helpers and the three benches in --quick mode.

No timing thresholds: a shared CPU makes them flaky. What is pinned is the shape of
the output (JSON keys, finite positive times, markdown rows) and the numbers that do
not depend on the clock (token counts, KV-cache bytes, budgets drawn). The benches run
with ``--threads 1``: on a busy 2-core runner, two OpenMP threads stall every small op
on the descheduled one, which makes --quick take minutes instead of seconds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flexproj.bench import kernels as kbench
from flexproj.bench.e2e import kv_cache_bytes
from flexproj.bench.report import markdown_table
from flexproj.bench.timing import Stopwatch, measure, summarize
from flexproj.bench.train import sample_budgets
from flexproj.cli import main
from flexproj.errors import ConfigError


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_timing(t: dict) -> None:
    for key in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms"):
        assert positive(t[key]), (key, t)
    assert t["q1_ms"] <= t["median_ms"] <= t["q3_ms"]
    assert t["iqr_ms"] >= 0 and t["repeats"] >= 1


def table_rows(markdown: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("| ") and not line.startswith("| ---") and "---:" not in line
    ]


# ----------------------------------------------------------------------------- timing / report


def test_summarize_quartiles_and_measure():
    t = summarize([4.0, 1.0, 3.0, 2.0, 5.0], warmup=2, first_s=9.0)
    assert (t.median_s, t.q1_s, t.q3_s, t.min_s, t.max_s) == (3.0, 2.0, 4.0, 1.0, 5.0)
    assert t.iqr_s == 2.0 and t.repeats == 5 and t.warmup == 2
    d = t.to_dict()
    assert d["median_ms"] == 3000.0 and d["first_ms"] == 9000.0
    assert summarize([0.5]).iqr_s == 0.0
    with pytest.raises(ValueError):
        summarize([])

    calls = []
    timing = measure(lambda: calls.append(sum(range(1000))), warmup=2, repeats=3)
    assert len(calls) == 5 and timing.repeats == 3 and timing.warmup == 2
    check_timing(timing.to_dict())
    watch = Stopwatch("cpu")
    watch.start()
    assert watch.lap() >= 0 and watch.stop() >= 0


def test_markdown_table_alignment():
    text = markdown_table(["name", "ms"], [["eager", "1.5 ±0.2"], ["auto", "-"]])
    lines = text.splitlines()
    assert lines[0] == "| name | ms |"
    assert lines[1] == "| :--- | ---: |"
    assert lines[2] == "| eager | 1.5 ±0.2 |"


# ----------------------------------------------------------------------------- kernels


def test_bench_kernels_quick(tmp_path, capsys):
    threads_before = torch.get_num_threads()
    out = tmp_path / "kernels"
    args = ["bench", "kernels", "--quick", "--threads", "1", "--shapes", "llava15", "qwen25vl7b"]
    args += ["--dtypes", "fp32", "bf16", "--tokens", "64", "144"]
    args += ["--backends", "eager", "xformers", "triton", "auto", "--out", str(out)]
    assert main(args) == 0
    payload = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert markdown.strip() in capsys.readouterr().out

    assert payload["bench"] == "kernels"
    env = payload["environment"]
    for key in ("device", "dtypes", "versions", "torch_threads", "cpu", "date", "command"):
        assert key in env, key
    assert env["device"] == "cpu" and env["dtypes"] == ["fp32", "bf16"]
    assert env["versions"]["torch"] == torch.__version__
    assert env["torch_threads"] == 1 and torch.get_num_threads() == threads_before

    rows = payload["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    for row in ok:
        check_timing(row["fwd"])
        check_timing(row["fwd_bwd"])
    # every (shape, dtype, N) has a floor, eager, auto and pool-after row; one stock per group
    for shape in ("llava15", "qwen25vl7b"):
        for dtype in ("fp32", "bf16"):
            group = [r for r in ok if r["shape"] == shape and r["dtype"] == dtype]
            for n in (64, 144):
                variants = {r["variant"] for r in group if r["tokens"] == n}
                assert {"floor", "eager", "xformers", "auto", "pool-after"} <= variants
            assert [r["variant"] for r in group if r["variant"] == "stock"] == ["stock"]
    triton = [r for r in rows if r["variant"] == "triton"]
    assert triton and all(
        r["status"] == "skipped" and r["reason"].startswith("n/a on cpu") for r in triton
    )
    eager = next(r for r in ok if r["variant"] == "eager")
    assert eager["ratios"]["fwd_eager"] == 1.0
    assert all(positive(eager["ratios"][k]) for k in ("fwd_floor", "fwd_bwd_floor", "fwd_stock"))
    auto = next(r for r in ok if r["variant"] == "auto")
    assert auto["resolves_to"] == "eager" and auto["max_abs_err_vs_eager"] == 0.0
    after = next(r for r in ok if r["variant"] == "pool-after" and r["shape"] == "llava15")
    assert after["ratios"]["ideal_pool_first_over_after"] == round(64 / 576, 4)
    assert payload["auto_check"]["auto_choice"] == ["eager"]
    assert len(payload["auto_check"]["cases"]) == 2 * 2 * 2

    table = table_rows(markdown)
    assert next(r for r in table if r[1] == "eager")[:2] == ["64", "eager"]
    assert any(r[1] == "auto (= eager)" for r in table)
    assert any(r[:3] == ["llava15", "fp32", "64"] for r in table)  # pool-after table
    assert "triton: n/a on cpu" in markdown


def test_bench_kernels_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown shape"):
        kbench.run_kernels(shapes=["nope"], quick=True, log=lambda s: None)
    with pytest.raises(ConfigError, match="unknown backend"):
        kbench.run_kernels(backends=["fast"], quick=True, log=lambda s: None)


# ----------------------------------------------------------------------------- e2e


def test_kv_cache_bytes_counts_every_tensor():
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(2):
        k = torch.zeros(1, 4, 10, 16)
        cache.update(k, k.clone(), layer)
    assert kv_cache_bytes(cache) == 2 * 2 * 4 * 10 * 16 * 4
    assert kv_cache_bytes(cache, positions=5) == 2 * 2 * 4 * 5 * 16 * 4
    legacy = ((torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16),) * 2,) * 3
    assert kv_cache_bytes(legacy) == 3 * 2 * 24 * 2


def test_bench_e2e_quick(tmp_path):
    out = tmp_path / "e2e"
    args = [
        "bench",
        "e2e",
        "--quick",
        "--threads",
        "1",
        "--families",
        "llava",
        "--tokens",
        "64",
        "144",
    ]
    assert main([*args, "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert payload["bench"] == "e2e" and payload["environment"]["device"] == "cpu"
    (family,) = payload["families"]
    assert family["family"] == "llava" and "error" not in family
    rows = {r["variant"]: r for r in family["rows"]}
    assert list(rows) == ["stock", "N=576", "N=64", "N=144"]
    assert [r["vision_tokens"] for r in rows.values()] == [576, 576, 64, 144]
    text = rows["stock"]["text_tokens"]
    # quick llava text tower: 2 layers, 4 KV heads of 16, fp32: K and V per token
    per_token = 2 * 2 * 4 * 16 * 4
    for row in rows.values():
        assert row["text_tokens"] == text
        assert row["prompt_tokens"] == row["vision_tokens"] + text
        assert row["kv_bytes"] == row["prompt_tokens"] * per_token
        assert row["ratios"]["kv_bytes"] == row["ratios"]["ideal_prefill"]
        check_timing(row["prefill"])
        check_timing(row["decode_per_token"])
        check_timing(row["vision"])
        assert row["generated"] == payload["config"]["decode_tokens"] + 1
    (headline,) = payload["headline"]
    assert positive(headline["speedup_vs_stock"]) and headline["ideal"] > 1
    table = table_rows(markdown)
    assert [r[0] for r in table] == ["variant", "stock", "N=576", "N=64", "N=144"]
    assert "Headline: prefill speed-up at 64 tokens" in markdown


# ----------------------------------------------------------------------------- train


def test_sample_budgets_is_seeded():
    a = sample_budgets((64, 144, 256), (2, 3, 5), 200, seed=3)
    assert a == sample_budgets((64, 144, 256), (2, 3, 5), 200, seed=3)
    assert set(a) == {64, 144, 256}
    assert sample_budgets((256,), (1,), 5, seed=0) == [256] * 5


def test_bench_train_quick(tmp_path):
    out = tmp_path / "train"
    assert main(["bench", "train", "--quick", "--threads", "1", "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert payload["bench"] == "train"
    cfg = payload["config"]
    assert cfg["isolated"] is True  # CPU default: each arm in a fresh process
    fixed, sched = payload["arms"]
    assert fixed["arm"] == "fixed-256" and sched["arm"] == "schedule 2:3:5"
    expected = sample_budgets((64, 144, 256), (2, 3, 5), cfg["steps"], cfg["seed"])
    assert [r["budget"] for r in sched["records"]] == expected
    assert [r["budget"] for r in fixed["records"]] == [256] * cfg["steps"]
    for arm in (fixed, sched):
        check_timing(arm["step"])
        assert all(r["vision_tokens"] == r["budget"] * cfg["batch"] for r in arm["records"])
        assert all(math.isfinite(r["loss"]) for r in arm["records"])
        assert arm["memory"]["method"].startswith("ru_maxrss")
        assert arm["memory"]["peak_bytes"] >= 0
    c = payload["comparison"]
    assert c["vision_tokens_ratio"] == round(sum(expected) / (256 * cfg["steps"]), 4)
    assert c["expected_vision_tokens_ratio"] == round(184 / 256, 4)
    assert positive(c["total_time_ratio"])
    table = table_rows(markdown)
    assert [r[0] for r in table[1:3]] == ["fixed-256", "schedule 2:3:5"]
    assert any(r[0] == "vision tokens" for r in table)


def test_bench_without_subcommand_prints_help(capsys):
    assert main(["bench"]) == 2
    assert "kernels" in capsys.readouterr().out


# ----------------------------------------------------------------------------- budgets


def test_bench_budgets_quick(tmp_path):
    out = tmp_path / "budgets"
    args = ["bench", "budgets", "--quick", "--repeats", "1", "--threads", "1", "--new-tokens", "2"]
    assert main([*args, "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["bench"] == "budgets"
    assert payload["config"]["budgets"] == [64, 64, 144, 144, 256, 256, 576, 576]
    assert set(payload["seconds"]) == {
        "mixed batch", "grouped per budget", "one at a time", "patched prefill",
        "direct prefill", "auto ladder", "largest budget",
    }  # fmt: skip
    assert all(s > 0 for s in payload["seconds"].values())
    for name, value in payload["ratios"].items():
        assert positive(value), name
    # the median first-rung confidence splits the requests: some stay low, some climb
    answered = payload["auto_answered_at"]
    assert len(answered) == 8 and set(answered) <= {64, 144, 256}
    assert min(answered) == 64 and max(answered) > 64
    assert "patched / direct prefill" in (out / "results.md").read_text()


def test_bench_gemma4_quick(tmp_path):
    """Each native budget below the encode budget against pooling to its own token count:
    equal tokens and KV bytes, the pooled rows' tower on the larger image."""
    out = tmp_path / "gemma4"
    args = ["bench", "gemma4", "--quick", "--side", "192", "--threads", "1"]
    assert main([*args, "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["bench"] == "gemma4"
    rows = payload["rows"]
    assert [r["budget"] for r in rows] == [70, 140]
    encode = payload["encode"]
    for r in rows:
        assert r["native_kv_bytes"] == r["pooled_kv_bytes"] > 0
        assert r["native_patches"] < r["pooled_patches"] == encode["tower_patches"]
        assert r["tokens"] < encode["tokens"] and positive(r["pooled_over_native_time"])
    assert main(["bench", "gemma4", "--quick", "--encode-budget", "100"]) == 2


def test_run_bench_passes_each_option_by_parameter_name(tmp_path):
    import argparse

    from flexproj.bench.report import run_bench

    def runner(*, text_hidden, quick, threads, log=print):
        return {"bench": "probe", "environment": {}, "got": [text_hidden, quick, threads]}

    args = argparse.Namespace(text_hidden=7, quick=True, threads=None, out=str(tmp_path), x=1)
    assert run_bench(args, runner, lambda p: f"{p['got']}\n") == 0
    assert json.loads((tmp_path / "results.json").read_text())["got"] == [7, True, None]
    with pytest.raises(TypeError, match=r"\['quick'\]"):  # never a silent default
        run_bench(argparse.Namespace(text_hidden=7, threads=None, out=None), runner, str)


def test_ratio_by_hand():
    from flexproj.bench.report import ratio

    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 3.0) == 0.3333
    assert ratio(None, 2.0) is None and ratio(2.0, None) is None and ratio(2.0, 0.0) is None


def _timed(median, **extra):
    return {"status": "ok", "fwd": {"median_ms": median}, "fwd_bwd": {"median_ms": 2 * median},
            **extra}  # fmt: skip


def test_kernel_ratios_by_hand():
    """Each ratio is the row's median over its reference's, from hand-set medians."""
    shape = kbench.SHAPES["llava15"]
    backends = {"eager": _timed(4.0), "compile": _timed(2.0)}
    floor, stock = _timed(1.0), _timed(8.0)
    after = _timed(16.0, n_out=144)
    kbench._add_ratios(backends, floor, stock, after, shape)
    assert backends["compile"]["ratios"] == {
        "fwd_floor": 2.0, "fwd_bwd_floor": 2.0, "fwd_eager": 0.5, "fwd_bwd_eager": 0.5,
        "fwd_stock": 0.25, "fwd_bwd_stock": 0.25,
    }  # fmt: skip
    # pool-first is the eager backend: 4 / 16 of pool-after; the ideal is N / grid tokens
    assert after["ratios"] == {
        "ideal_pool_first_over_after": round(144 / shape.grid_tokens, 4),
        "fwd_pool_first_over_after": 0.25,
        "fwd_bwd_pool_first_over_after": 0.25,
    }
    assert floor["ratios"] == {"fwd_stock": 0.125, "fwd_bwd_stock": 0.125}


def test_e2e_ratios_by_hand():
    """The LLM's prefill is prefill less the vision tower; every ratio is against stock."""
    from flexproj.bench.e2e import _add_stock_ratios

    def row(prompt, vision_tokens, prefill, vision, decode, kv):
        return {"prompt_tokens": prompt, "vision_tokens": vision_tokens,
                "prefill": {"median_ms": prefill}, "vision": {"median_ms": vision},
                "decode_per_token": {"median_ms": decode}, "kv_bytes": kv}  # fmt: skip

    rows = [row(600, 576, 100.0, 20.0, 10.0, 6000), row(88, 64, 30.0, 10.0, 8.0, 880)]
    _add_stock_ratios(rows)
    assert rows[1]["ratios"] == {
        "ideal_prefill": round(88 / 600, 4),
        "vision_tokens": round(64 / 576, 4),
        "prefill": 0.3,
        "llm_prefill": 0.25,  # (30 - 10) / (100 - 20)
        "decode_per_token": 0.8,
        "kv_bytes": round(880 / 6000, 4),
    }
    assert set(rows[0]["ratios"].values()) == {1.0}
