"""Bench reports: the environment, markdown tables, ``results.json`` + ``results.md``."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import inspect
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from flexproj.errors import ConfigError

__all__ = [
    "DTYPES",
    "dtype_name",
    "environment",
    "environment_markdown",
    "fmt_bytes",
    "fmt_ms",
    "fmt_ratio",
    "markdown_table",
    "pick_device",
    "run_bench",
    "set_threads",
    "write_results",
]

PACKAGES = ("torch", "transformers", "triton", "xformers", "flexproj")

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (recorded by :func:`environment`).

    On a CPU shared with other work, more OpenMP threads than free cores make every
    parallel region wait for a descheduled thread (milliseconds per op): use fewer.
    """
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def pick_device(name: str | None) -> torch.device:
    """``None``/``"auto"``: CUDA when there is one, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    return device


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtypes: Sequence[str] = ()) -> dict[str, Any]:
    """What a reader needs to compare two runs: device, versions, threads, date."""
    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_desc = f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        device_desc = f"cpu: {_cpu_model()}"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_desc": device_desc,
        "dtypes": list(dtypes),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "loadavg_start": _loadavg(),
        "command": _command(),
    }


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _command() -> str:
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) in ("flexproj", "cli.py", "__main__.py"):
        argv = ["flexproj", *argv[1:]]
    return " ".join(argv)


def fmt_ms(ms: float | None, iqr: float | None = None) -> str:
    if ms is None:
        return "-"
    digits = 2 if ms < 10 else 1 if ms < 1000 else 0
    text = f"{ms:.{digits}f}"
    if iqr is not None:
        text += f" ±{iqr:.{digits}f}"
    return text


def fmt_ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""

    def numeric(cell: Any) -> bool:
        text = str(cell).lstrip("±-").split(" ")[0]
        try:
            float(text)
        except ValueError:
            return False
        return True

    align = [
        "---:" if rows and all(numeric(r[i]) or str(r[i]) == "-" for r in rows) else ":---"
        for i in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "| " + " | ".join(align) + " |",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_markdown(env: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return (
        f"- date: {env['date']}\n"
        f"- device: {env['device_desc']} ({env['cpu_count']} CPUs visible, "
        f"torch threads {env['torch_threads']})\n"
        f"- versions: {versions}; python {env['python']}\n"
        f"- load average (1/5/15 min) at start: {env.get('loadavg_start')}, at end: "
        f"{env.get('loadavg_end')}\n"
        f"- command: `{env['command']}`"
    )


def write_results(
    out_dir: str | Path | None, payload: dict[str, Any], render: Callable[[dict[str, Any]], str]
) -> str:
    """Stamp the end load average, render ``payload`` to markdown and print it; with
    ``out_dir``, also write ``results.json`` and ``results.md`` there. Returns the markdown."""
    payload["environment"]["loadavg_end"] = _loadavg()
    markdown = render(payload)
    print(markdown)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (out / "results.md").write_text(markdown + "\n")
        print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")
    return markdown


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded to 4 places, or ``None`` when either is missing (or ``b`` is 0)."""
    return None if a is None or b is None or b == 0 else round(a / b, 4)


def add_output_options(parser: Any) -> None:
    """``--threads`` and ``--out``, shared by every bench command."""
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--out", default=None, help="write results.json and results.md here")


def run_and_write(
    out_dir: str | Path | None,
    compute: Callable[[], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    ok: Callable[[dict[str, Any]], bool] = lambda payload: True,
) -> int:
    """Run one bench, write its results; the thread count it set lasts for this command only."""
    import torch

    threads = torch.get_num_threads()
    try:
        payload = compute()
        write_results(out_dir, payload, render)
        return 0 if ok(payload) else 1
    finally:
        torch.set_num_threads(threads)


def run_bench(
    args: argparse.Namespace,
    runner: Callable[..., dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    ok: Callable[[dict[str, Any]], bool] = lambda payload: True,
) -> int:
    """One bench command: ``runner`` called with each of its keyword-only parameters (but
    ``log``) from the command-line option of that name (``--text-hidden`` is
    ``text_hidden``), its results written by :func:`run_and_write`."""
    names = [
        name
        for name, parameter in inspect.signature(runner).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY and name != "log"
    ]
    missing = [name for name in names if not hasattr(args, name)]
    if missing:  # a parameter without an option would silently keep its default
        raise TypeError(f"{runner.__name__} takes {missing}, which the command line lacks")
    return run_and_write(
        args.out, lambda: runner(**{n: getattr(args, n) for n in names}), render, ok
    )
