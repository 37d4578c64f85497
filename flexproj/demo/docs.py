"""Step 8: README.md's and docs/DEMO.md's demo tables and readings, written from ``results.json``.

Every published number is printed here from a run: each section sits between marker
comments, ``<!-- demo:TASK:NAME -->`` and ``<!-- /demo:TASK:NAME -->``, and ``flexproj demo
--docs write`` replaces what is between them. ``--docs check`` (``make check-docs``) fails
when a fresh run prints different accuracy tables or readings than the committed ones;
the run section (wall time, machine load) is written but never compared (it varies).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from flexproj.demo.report import (
    accuracy_tables,
    auto_table,
    cost_table,
    distill_lines,
    format_convert_table,
)
from flexproj.errors import FlexprojError

__all__ = ["DocsError", "check_docs", "check_markers", "reading", "sections", "write_docs"]

#: where each section goes: file (relative to the repository root) -> section names;
#: README shows the default task only (:func:`targets`)
TARGETS = {"README.md": ("table", "reading"), "docs/DEMO.md": ("report", "reading", "run")}
README_TASK = "flag"


def targets(task: str) -> dict[str, tuple[str, ...]]:
    """The files and sections of ``task``'s run."""
    return {f: names for f, names in TARGETS.items() if f != "README.md" or task == README_TASK}


#: the sections a fresh run must reproduce exactly (accuracies, steps, tokens: no times)
CHECKED = ("table", "report", "reading")


class DocsError(FlexprojError):
    """A docs file lacks a section's markers, or a fresh run differs from it."""


def _marks(task: str, name: str) -> tuple[str, str]:
    return f"<!-- demo:{task}:{name} -->", f"<!-- /demo:{task}:{name} -->"


def _pct(stat: dict[str, float]) -> str:
    return f"{stat['mean'] * 100:.1f}"


def _acc(results: dict[str, Any], row: str, n: int, kind: str = "all") -> dict[str, float]:
    return dict(results["rows"][row]["accuracy"][str(n)][kind])


def _quarter(results: dict[str, Any]) -> int:
    """The evaluation budget nearest a quarter of native (the paper's 144 of 576)."""
    native = results["native_tokens"]
    return min(results["eval_tokens"], key=lambda n: (abs(n - native / 4), n))


def _native_lines(results: dict[str, Any]) -> list[str]:
    """Every converted row at the native budget against stock (the native-budget rule)."""
    native = results["native_tokens"]
    stock = _acc(results, "stock", native)
    out = []
    for row, rec in results["rows"].items():
        if row == "stock":
            continue
        got = _acc(results, row, native)
        diff = (got["mean"] - stock["mean"]) * 100
        verdict = "OUTSIDE" if _loses_native(results, row) else "within"
        out.append(f"{rec['label']} {_pct(got)} ({diff:+.1f}, {verdict} max(1, std))")
    return out


def _loses_native(results: dict[str, Any], row: str) -> bool:
    """Whether ``row`` is below stock at the native budget by more than max(1, either std)."""
    native = results["native_tokens"]
    stock, got = _acc(results, "stock", native), _acc(results, row, native)
    diff = (got["mean"] - stock["mean"]) * 100
    return -diff > max(1.0, stock["std"] * 100, got["std"] * 100)


def _losses(results: dict[str, Any]) -> list[str]:
    """Where TokenFLEX (align, finetune) is below a fixed-N model at N, or below stock at
    native, by more than the larger std (or 1 point with one seed)."""
    found = []
    native = results["native_tokens"]
    for row in ("tokenflex_align", "tokenflex_finetune"):
        mine_label = results["rows"][row]["label"].split(":")[0]
        refs = [(f"fixed_{n}", n) for n in results["train_tokens"]] + [("stock", native)]
        for ref, n in refs:
            mine, theirs = _acc(results, row, n), _acc(results, ref, n)
            gap = (theirs["mean"] - mine["mean"]) * 100
            if gap > max(1.0, mine["std"] * 100, theirs["std"] * 100):
                name = "stock" if ref == "stock" else f"fixed-{n}"
                found.append(
                    f"{mine_label} ({row.split('_')[1]}) at {n}: {_pct(mine)} vs {name} "
                    f"{_pct(theirs)} ({-gap:+.1f})"
                )
    return found


def _below_training_free(results: dict[str, Any]) -> list[str]:
    """Budgets where TokenFLEX (align) is below training-free pool-after by more than the spread."""
    found = []
    for n in results["eval_tokens"]:
        mine, free = _acc(results, "tokenflex_align", n), _acc(results, "pool_after", n)
        gap = (free["mean"] - mine["mean"]) * 100
        if gap > max(1.0, mine["std"] * 100, free["std"] * 100):
            found.append(f"{n}: {_pct(mine)} vs {_pct(free)}")
    return found


def _fine_detail(results: dict[str, Any], fine: str) -> str:
    """The best converted row on the fine-detail kind at each budget below native."""
    native = results["native_tokens"]
    best = []
    for n in results["eval_tokens"]:
        if n == native:
            continue
        rows = [r for r in results["rows"] if r != "stock"]
        top = max(rows, key=lambda r: _acc(results, r, n, fine)["mean"])
        best.append(f"{_pct(_acc(results, top, n, fine))} at {n}")
    return ", ".join(best)


def _best_below_native(results: dict[str, Any], fine: str) -> float:
    return max(
        _acc(results, r, n, fine)["mean"]
        for r in results["rows"]
        if r != "stock"
        for n in results["eval_tokens"]
        if n != results["native_tokens"]
    )


def reading(results: dict[str, Any]) -> str:
    """The numbers a reader compares, as sentences (every number from ``results``)."""
    native, q = results["native_tokens"], _quarter(results)
    fine, coarse = results["kinds"][-1], results["kinds"][0]
    train = results["train_tokens"]
    stock = _acc(results, "stock", native, fine)
    pooled = _acc(results, "pool_after", q, fine)
    ratio = pooled["mean"] / stock["mean"] if stock["mean"] else float("nan")
    at = ", ".join(str(n) for n in train)

    def across(row: str, kind: str = "all") -> str:
        return " / ".join(_pct(_acc(results, row, n, kind)) for n in train)

    fixed = [
        f"fixed-{n}: {_pct(_acc(results, f'fixed_{n}', n))} at {n}, worst elsewhere "
        + min(
            (f"{_pct(_acc(results, f'fixed_{n}', m))} at {m}" for m in train if m != n),
            key=lambda t: float(t.split()[0]),
        )
        for n in train
    ]
    losses = _losses(results)
    native_losers = [r for r in results["rows"] if r != "stock" and _loses_native(results, r)]
    cost = results["rows"]["tokenflex_align"]["cost_vs_stock"]
    lines = [
        f"- Stock at its native {native} tokens: {_pct(_acc(results, 'stock', native))}% of all "
        f"questions, {_pct(stock)}% of the {fine} questions (fine detail), "
        f"{_pct(_acc(results, 'stock', native, coarse))}% of the {coarse} questions.",
        f"- Training-free pool-after at {q} tokens (about a quarter of native): {fine} "
        f"{_pct(pooled)}% ({ratio:.2f}x stock), {coarse} "
        f"{_pct(_acc(results, 'pool_after', q, coarse))}%; at {train[0]} tokens {fine} "
        f"{_pct(_acc(results, 'pool_after', train[0], fine))}%.",
        "- At the native budget (the native-budget rule): "
        + "; ".join(_native_lines(results))
        + ".",
        f"- TokenFLEX at the training budgets {at}, all questions: align {across('tokenflex_align')}, "
        f"finetune {across('tokenflex_finetune')}; {fine} questions: align "
        f"{across('tokenflex_align', fine)}, finetune {across('tokenflex_finetune', fine)}.",
        "- Fixed-N models at their own budget and away from it: " + "; ".join(fixed) + ".",
        "- Where the flexible model loses (below a fixed-N model at N or stock at native by "
        "more than the spread): " + ("; ".join(losses) if losses else "nowhere in this run") + ".",
        "- Converted rows that lose the native budget (outside max(1, std) of stock there): "
        + (", ".join(results["rows"][r]["label"] for r in native_losers) or "none")
        + (
            " (a row that trains the stock projector itself keeps no untouched copy for the "
            "native-budget rule to run)"
            if "pool_after_flex" in native_losers
            else ""
        )
        + ".",
        "- TokenFLEX (align) below training-free pool-after by more than the spread, at: "
        + ("; ".join(_below_training_free(results)) or "no budget")
        + f" (budgets above the largest trained one, {max(train)}, are extrapolation).",
        f"- Fine detail below native: the best converted row on the {fine} questions reaches "
        f"{_fine_detail(results, fine)}, against {_pct(stock)} for stock at {native}"
        + (
            ": below native no row keeps even three quarters of it, so these questions need "
            "the native budget (the automatic budget's job)."
            if _best_below_native(results, fine) < 0.75 * stock["mean"]
            else "."
        ),
        f"- Cost of TokenFLEX align against the stock training: {cost['steps']:.0%} of its steps, "
        f"{cost['vision_tokens']:.0%} of its vision tokens (plus "
        f"{results['config']['distill_steps']} distillation steps that feed the LLM nothing).",
    ]
    return "\n".join(lines)


def sections(results: dict[str, Any]) -> dict[str, str]:
    """Every docs section of one run, by name."""
    fine = results["kinds"][-1]
    table = "\n\n".join(
        [
            "All questions (accuracy %, mean±std over seeds; * = a training budget):",
            format_convert_table(results, "all"),
            f"{fine} questions (fine detail):",
            format_convert_table(results, fine),
        ]
    )
    report = "\n\n".join(
        p
        for p in (
            accuracy_tables(results),
            cost_table(results, times=False),
            auto_table(results),
            distill_lines(results),
        )
        if p
    )
    env = results.get("environment", {})
    run = (
        f"This run: {results.get('total_wall_s', 0):.0f} s wall on {env.get('cpu_count')} CPU "
        f"cores ({results.get('workers')} worker processes), load average "
        f"{env.get('loadavg_start')} at the start and {env.get('loadavg_end')} at the end "
        f"(other work on the machine slows it); torch {env.get('torch')}. Per-row times:\n\n"
        + cost_table(results, times=True)
    )
    return {"table": table, "report": report, "reading": reading(results), "run": run}


def _section(text: str, task: str, name: str, file: Path) -> re.Match[str]:
    start, end = _marks(task, name)
    match = re.search(re.escape(start) + r"\n(.*?)\n?" + re.escape(end), text, flags=re.S)
    if match is None:
        raise DocsError(f"{file} has no section {start} ... {end}")
    return match


def check_markers(task: str, root: str | Path = ".") -> None:
    """:class:`DocsError` unless every docs file holds every section of ``task``."""
    for rel, names in targets(task).items():
        file = Path(root) / rel
        text = file.read_text()
        for name in names:
            _section(text, task, name, file)


#: the plot of each task's run, as the docs show it (relative to the repository root)
PLOTS = {"flag": "docs/demo_convert_accuracy_vs_budget.png", "board": "docs/demo_convert_board.png"}


def write_docs(
    results: dict[str, Any], root: str | Path = ".", plot: str | Path | None = None
) -> list[Path]:
    """Replace every section of ``results``' task in the docs under ``root`` (and copy the
    run's ``plot`` to where the docs show it); returns the files written."""
    task, made = results["config"]["task"], sections(results)
    written = []
    if plot is not None and task in PLOTS:
        target = Path(root) / PLOTS[task]
        target.write_bytes(Path(plot).read_bytes())
        written.append(target)
    for rel, names in targets(task).items():
        file = Path(root) / rel
        text = file.read_text()
        for name in names:
            match = _section(text, task, name, file)
            text = text[: match.start(1)] + "\n" + made[name] + "\n\n" + text[match.end(1) :]
        file.write_text(text)
        written.append(file)
    return written


def check_docs(results: dict[str, Any], root: str | Path = ".") -> list[str]:
    """The differences between a fresh run's checked sections and the committed ones (a
    unified diff per section; empty when they agree)."""
    task, made = results["config"]["task"], sections(results)
    problems = []
    for rel, names in targets(task).items():
        file = Path(root) / rel
        text = file.read_text()
        for name in names:
            if name not in CHECKED:
                continue
            committed = _section(text, task, name, file).group(1).strip("\n")
            fresh = made[name].strip("\n")
            if committed != fresh:
                diff = difflib.unified_diff(
                    committed.splitlines(), fresh.splitlines(),
                    f"{rel} (committed)", f"{rel} (this run)", lineterm="",
                )  # fmt: skip
                problems.append(f"{rel}: section {task}:{name} differs\n" + "\n".join(diff))
    return problems
