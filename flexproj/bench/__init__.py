"""Benchmarks behind ``flexproj bench``: kernels, end-to-end latency, training steps.

* :mod:`flexproj.bench.kernels`: the projector per SwiGLU backend against the matmul
  floor, the stock projector and the pool-after layout.
* :mod:`flexproj.bench.e2e`: prefill and decode latency and KV-cache bytes per budget
  of patched models (realistic widths, few layers).
* :mod:`flexproj.bench.train`: step time, peak memory and vision tokens per step,
  fixed budget vs the TokenFLEX 2:3:5 schedule.
* :mod:`flexproj.bench.timing` / :mod:`flexproj.bench.report`: the shared timer and
  the markdown + JSON output.

Each ``run_*`` function returns a JSON-ready payload; the command line writes it as
``results.json`` and ``results.md`` under ``--out``.
"""

from flexproj.bench.timing import Stopwatch, Timing, measure, summarize

__all__ = ["Stopwatch", "Timing", "measure", "summarize"]
