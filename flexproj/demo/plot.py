"""Step 6: accuracy against the evaluation budget, one panel per question kind."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["budget_axes", "plot", "plot_convert"]


def budget_axes(ax: Any, budgets: Sequence[int], train_tokens: Sequence[int], kind: str) -> None:
    """Accuracy-vs-budget axes: log budgets, training budgets marked, one panel per kind."""
    for n in train_tokens:
        ax.axvline(n, color="0.85", lw=0.8, zorder=0)
    ax.set_ylim(0, 105)
    ax.set_xscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(n) for n in budgets], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("vision tokens at evaluation")
    ax.set_title(kind if kind != "all" else "all questions")
    ax.grid(alpha=0.3)


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy vs evaluation budget, one line per training schedule (error bars: std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = results["eval_tokens"]
    kinds = ["all", *results["kinds"]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, rec in results["runs"].items():
            mean = [rec["accuracy"][str(n)][kind]["mean"] * 100 for n in budgets]
            std = [rec["accuracy"][str(n)][kind]["std"] * 100 for n in budgets]
            style = "-" if name.startswith("flex") else "--"
            width = 2.4 if name.startswith("flex") else 1.4
            ax.errorbar(
                budgets,
                mean,
                yerr=std,
                fmt=style,
                marker="o",
                ms=3,
                lw=width,
                capsize=2,
                label=name,
            )
        budget_axes(ax, budgets, results["train_tokens"], kind)
    axes[0][0].set_ylabel("exact-match accuracy (%)")
    axes[0][0].legend(fontsize=8, title="trained with", title_fontsize=8)
    seeds = results["config"]["seeds"]
    fig.suptitle(
        f"flexproj demo: tiny LLaVA, native {results['native_tokens']} tokens, "
        f"{seeds} seed(s), error bars = std over seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: how each conversion row is drawn: the rows a reader compares (stock, pool-after,
#: TokenFLEX, fixed-N) in distinct colours and line styles; (colour, style, width, marker)
_STYLES: dict[str, tuple[str, str, float, str]] = {
    "pool_after": ("0.45", "--", 1.6, "s"),
    "distilled": ("0.65", ":", 1.4, "x"),
    "tokenflex_align": ("#1f5fbf", "-", 2.6, "o"),
    "tokenflex_finetune": ("#7b2cbf", "-", 2.6, "D"),
    "tokenflex_per_sample": ("#6fa8dc", "-", 1.2, "."),
    "pool_after_flex": ("#e69f00", "-.", 1.4, "^"),
}
_FIXED = ("#2e8b57", "#c0392b", "#8e6c1f", "#117a8b")  # fixed-N, in order of N
#: rows whose ±std band is drawn (light, under the lines): the flexible rows only
_BANDS = ("tokenflex_align", "tokenflex_finetune")


def _style(row: str, results: dict[str, Any]) -> tuple[str, str, float, str]:
    if row.startswith("fixed_"):
        n = int(row.removeprefix("fixed_"))
        return _FIXED[results["train_tokens"].index(n) % len(_FIXED)], "--", 1.3, "v"
    return _STYLES.get(row, ("0.3", "-", 1.0, "."))


def plot_convert(results: dict[str, Any], path: Path) -> None:
    """Accuracy vs evaluation budget, one panel per question kind, one line per row.

    The stock model is a black star at its native budget; the ±std band is drawn for the
    two TokenFLEX rows only, light and under every line; the legend sits below the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = results["eval_tokens"]
    kinds = ["all", *results["kinds"]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 4.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for row, rec in results["rows"].items():
            ns = [n for n in budgets if str(n) in rec["accuracy"]]
            mean = [rec["accuracy"][str(n)][kind]["mean"] * 100 for n in ns]
            std = [rec["accuracy"][str(n)][kind]["std"] * 100 for n in ns]
            if row == "stock":
                ax.errorbar(ns, mean, yerr=std, fmt="*", ms=15, color="black",
                            label=rec["label"], zorder=6)  # fmt: skip
                continue
            colour, style, width, marker = _style(row, results)
            ax.plot(ns, mean, style, color=colour, lw=width, marker=marker, ms=4,
                    label=rec["label"], zorder=4 if row in _BANDS else 3)  # fmt: skip
            if row in _BANDS:
                low = [m - s for m, s in zip(mean, std, strict=True)]
                high = [m + s for m, s in zip(mean, std, strict=True)]
                ax.fill_between(ns, low, high, color=colour, alpha=0.10, lw=0, zorder=1)
        budget_axes(ax, budgets, results["train_tokens"], kind)
    axes[0][0].set_ylabel("exact-match accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    seeds = results["config"]["seeds"]
    fig.suptitle(
        f"flexproj demo: converting a trained tiny {results['family']} (native "
        f"{results['native_tokens']} tokens, task {results['config'].get('task', '?')}), "
        f"{seeds} seed(s); shaded: ±std of the TokenFLEX rows",
        fontsize=10,
    )
    rows_of_legend = (len(labels) + 1) // 2
    fig.tight_layout(rect=(0, 0.035 * rows_of_legend + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
