"""``run_convert``: the conversion experiment from top to bottom (``flexproj demo``).

1. data (:mod:`.data`) -> 2. base models (:mod:`.base_model`) -> 3. trained rows, each
evaluated (:mod:`.rows`, :mod:`.evaluation`) -> 4. gathered over seeds and printed
(:mod:`.report`) -> 5. the plot (:mod:`.plot`); ``results.json`` holds everything, and
:mod:`.docs` writes README's and docs/DEMO.md's tables from it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flexproj.demo.base_model import write_base_model
from flexproj.demo.config import ConvertConfig
from flexproj.demo.data import write_convert_data
from flexproj.demo.plot import plot_convert
from flexproj.demo.report import (
    convert_results,
    environment,
    format_convert_report,
    loadavg,
    write_outputs,
)
from flexproj.demo.rows import run_tasks

__all__ = ["run_convert"]


def run_convert(
    cfg: ConvertConfig,
    out_dir: str | Path,
    *,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the stock reference per seed, convert it every way, evaluate, write the outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    load_start = loadavg()
    log(
        f"flexproj demo (convert, {cfg.family}): native {cfg.native_tokens} tokens; stock "
        f"reference {cfg.stock_steps} steps x {cfg.batch_size} images; conversion rows "
        f"{cfg.convert_steps} steps ({cfg.convert_steps / cfg.stock_steps:.0%}); flex schedule "
        f"{cfg.flex_schedule}; eval budgets {list(cfg.eval_tokens or ())}; {cfg.seeds} seed(s); "
        f"{workers} worker(s)"
    )
    write_convert_data(cfg, work / "data")
    for seed in range(cfg.seeds):
        seed_dir = work / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        base = write_base_model(cfg, seed, seed_dir / "init")
        (seed_dir / "base.json").write_text(json.dumps(list(base)))
    records = run_tasks(cfg, work, workers, log)
    results = convert_results(cfg, records)
    results["workers"] = workers
    results["environment"] = environment(load_start)
    write_outputs(results, out, plot_convert, format_convert_report, t0, log)
    return results
