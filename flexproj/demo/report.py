"""Step 5: the rows gathered over seeds (mean, std, costs relative to the stock training) and
the printed report: the tables per question kind, the costs, the automatic budget and the
distillation's errors."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from flexproj.demo.config import ConvertConfig, row_label

__all__ = [
    "cell",
    "convert_results",
    "format_convert_report",
    "format_convert_table",
    "loadavg",
    "mean_spread",
    "pipe_table",
]


def pipe_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first is the header) as an aligned markdown table: labels left, cells right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def cell(stat: dict[str, float], seeds: int, pct: bool = True) -> str:
    scale = 100.0 if pct else 1.0
    if seeds > 1:
        return f"{stat['mean'] * scale:.1f}±{stat['std'] * scale:.1f}"
    return f"{stat['mean'] * scale:.1f}"


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (wall times mean little on a busy machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(load_start: list[float] | None) -> dict[str, Any]:
    """The machine a run ran on (wall times mean little without the load beside them)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "platform": platform.platform(),
    }


def write_outputs(
    results: dict[str, Any],
    out: Path,
    plot: Callable[[dict[str, Any], Path], None],
    report: Callable[[dict[str, Any]], str],
    started: float,
    log: Callable[[str], None],
) -> None:
    """The plot, ``results.json`` (with the total wall time since ``started``) and the report."""
    plot_path = out / "accuracy_vs_budget.png"
    plot(results, plot_path)
    results["plot"] = plot_path.name
    results["total_wall_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log("")
    log(report(results))
    log(f"\nwrote {out / 'results.json'} and {plot_path} in {results['total_wall_s']:.0f} s")


def convert_results(cfg: ConvertConfig, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows x budgets, mean/std over seeds, and each row's conversion cost."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for rec in sorted(records, key=lambda r: r["seed"]):
        by_task.setdefault(rec["task"], []).append(rec)
    kinds = ["all", *cfg.kinds]
    budgets = [str(n) for n in cfg.eval_tokens or ()]
    native = str(cfg.native_tokens)
    stock = by_task["stock"]
    stock_cost = {
        "steps": statistics.fmean(r["steps"] for r in stock),
        "vision_tokens": statistics.fmean(r["vision_tokens"] for r in stock),
        "train_s": statistics.fmean(r["train_s"] for r in stock),
    }
    rows: dict[str, dict[str, Any]] = {}
    for row in cfg.rows():
        task = "stock" if row == "pool_after" else row
        seeds = by_task[task]
        cols = [native] if row == "stock" else budgets
        accuracy = {
            n: {k: mean_spread([s["accuracy"][n][k] for s in seeds]) for k in kinds} for n in cols
        }
        if row in ("stock", "pool_after"):
            cost = {"steps": 0, "vision_tokens": 0, "train_s": 0.0, "images": 0}
            if row == "stock":
                cost = {**stock_cost, "images": stock[0]["images"]}
        else:
            cost = {
                "steps": statistics.fmean(r["steps"] for r in seeds),
                "vision_tokens": statistics.fmean(r["vision_tokens"] for r in seeds),
                "train_s": statistics.fmean(r["train_s"] for r in seeds),
                "images": statistics.fmean(r["images"] for r in seeds),
            }
        if row.startswith(("tokenflex", "fixed_")):  # the distillation comes first
            distilled = by_task["distilled"]
            cost["distill_steps"] = cfg.distill_steps
            cost["distill_s"] = statistics.fmean(r["train_s"] for r in distilled)
        autos = [s["auto"] for s in seeds]  # pool_after: the stock run, evaluated pooled
        rows[row] = {
            "label": row_label(row),
            "accuracy": accuracy,
            # flexproj.adaptive_generate over training budgets + native (chosen threshold)
            "auto": {
                "accuracy": mean_spread([a["accuracy"] for a in autos]),
                "native_accuracy": mean_spread([a["native_accuracy"] for a in autos]),
                "threshold": [a["threshold"] for a in autos],
                "vision_tokens_per_image": mean_spread(
                    [a["vision_tokens_per_image_spent"] for a in autos]
                ),
                "mean_budget_by_kind": {
                    k: statistics.fmean(a["mean_budget_by_kind"].get(k, 0) for a in autos)
                    for k in cfg.kinds
                },
            }
            if autos and row != "stock"
            else None,
            "seeds": [
                {"seed": s["seed"], "accuracy": {n: s["accuracy"][n] for n in cols}} for s in seeds
            ],
            "cost": cost,
            "cost_vs_stock": {
                "steps": cost["steps"] / stock_cost["steps"],
                "vision_tokens": cost["vision_tokens"] / stock_cost["vision_tokens"],
                "train_s": (cost["train_s"] + cost.get("distill_s", 0.0)) / stock_cost["train_s"],
            },
        }
    distill = [r["distill"] for r in by_task.get("distilled", [])]
    distill_summary = {
        n: {
            key: statistics.fmean(d["per_budget"][n][key] for d in distill)
            for key in ("cosine_before", "cosine_after", "mse_before", "mse_after")
        }
        for n in (distill[0]["per_budget"] if distill else {})
    }
    return {
        "experiment": "convert",
        "config": dataclasses.asdict(cfg),
        "family": cfg.family,
        "native_tokens": cfg.native_tokens,
        "train_tokens": list(cfg.train_tokens or ()),
        "eval_tokens": list(cfg.eval_tokens or ()),
        "kinds": list(cfg.kinds),
        "metric": "exact match of the greedy answer (flexproj.recipes.evaluate)",
        "rows": rows,
        "distill": distill_summary,
        "records": list(records),
    }


def format_convert_table(results: dict[str, Any], kind: str = "all") -> str:
    budgets = [str(n) for n in results["eval_tokens"]]
    train = {str(n) for n in results["train_tokens"]}
    head = ["row \\ eval"] + [f"{n}{'*' if n in train else ''}" for n in budgets]
    lines = [head]
    for rec in results["rows"].values():
        seeds = len(rec["seeds"])
        lines.append(
            [rec["label"]]
            + [
                cell(rec["accuracy"][n][kind], seeds) if n in rec["accuracy"] else ""
                for n in budgets
            ]
        )
    return pipe_table(lines)


def accuracy_tables(results: dict[str, Any]) -> str:
    """The accuracy tables: all questions, then one per question kind."""
    spread = " (mean±std over seeds)" if results["config"]["seeds"] > 1 else ""
    parts = [
        f"Accuracy (%) of each conversion (rows) at each evaluation budget (columns){spread}; "
        f"{results['family']}, native = {results['native_tokens']} tokens; * = a training budget "
        "of the recipe rows.",
        "",
        "All questions:",
        "",
        format_convert_table(results, "all"),
    ]
    for kind in results["kinds"]:
        parts += ["", f"{kind}:", "", format_convert_table(results, kind)]
    return "\n".join(parts)


def cost_table(results: dict[str, Any], *, times: bool = True) -> str:
    """Each row's conversion cost against the stock training: steps and vision tokens (and,
    with ``times``, seconds: they vary with the machine's load, so the docs check leaves
    them out)."""
    time_head, time_rel = (" train s |", " / time") if times else ("", "")
    lines = [
        "Conversion cost per row (mean over seeds; relative to training the stock model):",
        "",
        f"| row | steps | vision tokens |{time_head} vs stock: steps / tokens{time_rel} |",
        "|---|---|---|" + ("---|" if times else "") + "---|",
    ]
    for rec in results["rows"].values():
        c, rel = rec["cost"], rec["cost_vs_stock"]
        steps = f"{c['steps']:.0f}" + (
            f" + {c['distill_steps']} distill" if "distill_steps" in c else ""
        )
        seconds = f" {c['train_s'] + c.get('distill_s', 0.0):.1f} |" if times else ""
        share = f"{rel['steps']:.0%} / {rel['vision_tokens']:.0%}"
        share += f" / {rel['train_s']:.0%}" if times else ""
        lines.append(
            f"| {rec['label']} | {steps} | {c['vision_tokens'] / 1e6:.3f} M |{seconds} {share} |"
        )
    return "\n".join(lines)


def auto_table(results: dict[str, Any]) -> str:
    """The automatic budget per row, scored on held-out questions ("" when none)."""
    autos = [rec for rec in results["rows"].values() if rec.get("auto")]
    if not autos:
        return ""
    kinds = results["kinds"]
    lines = [
        "Automatic budget (flexproj.adaptive_generate over the training budgets + native): "
        "per seed, the cheapest threshold within 1 point of the native budget's accuracy "
        "on half the evaluation questions (`flexproj eval --auto`'s sweep), scored on the "
        "other half, next to the native budget on that same half:",
        "",
        "| row | accuracy (held out) | native budget, same questions | vision tokens / image spent | "
        + " | ".join(f"mean budget: {k}" for k in kinds)
        + " |",
        "|---|---|---|---|" + "---|" * len(kinds),
    ]
    for rec in autos:
        auto = rec["auto"]
        seeds = len(rec["seeds"])
        tokens = auto["vision_tokens_per_image"]
        spread = f" ± {tokens['std']:.1f}" if seeds > 1 else ""
        lines.append(
            f"| {rec['label']} | {cell(auto['accuracy'], seeds)} | "
            f"{cell(auto['native_accuracy'], seeds)} | {tokens['mean']:.1f}{spread} | "
            + " | ".join(f"{auto['mean_budget_by_kind'][k]:.1f}" for k in kinds)
            + " |"
        )
    return "\n".join(lines)


def distill_lines(results: dict[str, Any]) -> str:
    """The distillation's error per budget, before -> after ("" when no row distilled)."""
    if not results["distill"]:
        return ""
    lines = [
        "Distillation (mean over seeds; fixed probe batch): per budget, cosine and relative "
        "MSE to the pooled stock outputs, before -> after:",
        "",
    ]
    for n, d in results["distill"].items():
        lines.append(
            f"    N={n:>4}: cosine {d['cosine_before']:.3f} -> {d['cosine_after']:.3f}, "
            f"rel. MSE {d['mse_before']:.3f} -> {d['mse_after']:.3f}"
        )
    return "\n".join(lines)


def format_convert_report(results: dict[str, Any], *, times: bool = True) -> str:
    """Everything a run printed: accuracy tables, costs, the automatic budget, distillation."""
    parts = [
        accuracy_tables(results),
        cost_table(results, times=times),
        auto_table(results),
        distill_lines(results),
    ]
    return "\n\n".join(p for p in parts if p)
