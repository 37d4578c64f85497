"""``flexproj bench kernels``: the projector per SwiGLU backend, against references.

For every shape, dtype and budget N it times, in one process and on the same inputs:

* the pool-first FlexProjector (pool -> LayerNorm -> SwiGLU) with each backend
  (``eager``, ``xformers``, ``compile``, ``triton``, ``auto``), forward (under
  ``torch.no_grad``) and forward + backward (input and weights require grad);
* the **floor**: the projector's matrix products alone on the pooled rows
  (``x @ W12`` and ``u @ W3`` with biases, ``u`` a ready-made hidden tensor), without
  LayerNorm, pooling or the ``silu(a) * b`` in between. No backend can beat it;
* the **stock** projector of the shape's model at its native token count (LLaVA's
  Linear-GELU-Linear, or Qwen2.5-VL's 2x2 PatchMerger);
* **pool-after** (Matryoshka-style): LayerNorm + SwiGLU on every native token, then
  pool to N. Pool-first should cost about ``N / native`` of it.

Triton on CPU runs only under ``TRITON_INTERPRET=1``, an interpreter far too slow to
time, so it is reported as "n/a on cpu" there.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexproj.bench.report import (
    DTYPES,
    add_output_options,
    environment,
    environment_markdown,
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

__all__ = ["BACKEND_ORDER", "SHAPES", "KernelShape", "add_arguments", "run", "run_kernels"]

BACKEND_ORDER = ("eager", "xformers", "compile", "triton", "auto")
DEFAULT_TOKENS = (64, 144, 256)


@dataclass(frozen=True)
class KernelShape:
    """One projector geometry: a patch grid of ``in_dim`` features per image -> LLM width."""

    name: str
    grid: tuple[int, int]  # source patch grid per image (CLS dropped)
    in_dim: int
    hidden_dim: int
    out_dim: int
    native: int  # vision tokens per image of the stock model
    stock: str  # "llava_mlp" or "qwen_merger"
    packed: bool = False  # Qwen layout: all images in one (sum H*W, C) tensor
    note: str = ""

    @property
    def grid_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def quick(self) -> KernelShape:
        """Same grid and budgets, widths divided by 64: runs in milliseconds."""
        return replace(
            self,
            name=self.name,
            in_dim=max(8, self.in_dim // 64),
            hidden_dim=max(24, self.hidden_dim // 64),
            out_dim=max(8, self.out_dim // 64),
        )


SHAPES: dict[str, KernelShape] = {
    "llava15": KernelShape(
        "llava15",
        grid=(24, 24),
        in_dim=1024,
        hidden_dim=3 * 1024,
        out_dim=4096,
        native=576,
        stock="llava_mlp",
        note="LLaVA-1.5-7B: CLIP-L/336 (24x24 patches, width 1024) -> Vicuna-7B (4096); "
        "stock: Linear(1024,4096)-GELU-Linear(4096,4096) on 576 tokens",
    ),
    "ristretto": KernelShape(
        "ristretto",
        grid=(27, 27),
        in_dim=1152,
        hidden_dim=3456,
        out_dim=2048,
        native=729,
        stock="llava_mlp",
        note="Ristretto-3B: SigLIP-so400m/384 (27x27, width 1152) -> Qwen2.5-3B (2048), "
        "hidden 3456; stock: LLaVA-style Linear(1152,2048)-GELU-Linear(2048,2048) on 729 tokens",
    ),
    "qwen25vl7b": KernelShape(
        "qwen25vl7b",
        grid=(32, 32),
        in_dim=1280,
        hidden_dim=3 * 1280,
        out_dim=3584,
        native=256,
        stock="qwen_merger",
        packed=True,
        note="Qwen2.5-VL-7B-like: a 448x448 image with patch 14 is 32x32 patches of width 1280, "
        "packed as (sum H*W, C); LLM 3584. FlexProjector pools the patch grid (as the qwen "
        "adapter does); stock: PatchMerger RMSNorm(1280) -> 2x2 merge (5120) -> "
        "Linear(5120,5120)-GELU-Linear(5120,3584), 256 tokens per image",
    ),
}


# ----------------------------------------------------------------------------- references


class LlavaMLP(nn.Module):
    """LLaVA's ``mlp2x_gelu`` projector: Linear(C, D) -> GELU -> Linear(D, D)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class QwenMerger(nn.Module):
    """Qwen2.5-VL's PatchMerger: RMSNorm(C), 2x2 units -> 4C, Linear-GELU-Linear -> D."""

    def __init__(self, in_dim: int, out_dim: int, merge: int = 2) -> None:
        super().__init__()
        width = in_dim * merge**2
        self.width = width
        self.ln_q = nn.RMSNorm(in_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


def _stock_module(shape: KernelShape) -> nn.Module:
    if shape.stock == "qwen_merger":
        return QwenMerger(shape.in_dim, shape.out_dim)
    return LlavaMLP(shape.in_dim, shape.out_dim)


# ----------------------------------------------------------------------------- one case


@dataclass
class Case:
    """Inputs and modules of one (shape, dtype) group."""

    shape: KernelShape
    dtype: torch.dtype
    device: torch.device
    batch: int
    proj: Any  # FlexProjector
    x: torch.Tensor  # (B, H*W, C), or packed (B*H*W, C)

    def pool_first(self, grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
        from flexproj.pooling import pool_grid, pool_packed

        src = self.shape.grid
        if self.shape.packed:
            grids, targets = [src] * self.batch, [grid] * self.batch
            return lambda x: self.proj.project(pool_packed(x, grids, targets))
        return lambda x: self.proj.project(pool_grid(x, src, grid))

    def pool_after(self, grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
        from flexproj.pooling import pool_grid, pool_packed

        src = self.shape.grid
        if self.shape.packed:
            grids, targets = [src] * self.batch, [grid] * self.batch
            return lambda x: pool_packed(self.proj.project(x), grids, targets)
        return lambda x: pool_grid(self.proj.project(x), src, grid)


@dataclass
class Variant:
    """One timed thing: ``forward()`` alone (no grad) or with backward into ``leaves``."""

    key: tuple[Any, ...]
    forward: Callable[[], Any]
    leaves: Sequence[torch.Tensor]
    backward: bool
    kernel: str | None = None  # set proj.kernel to this before each call
    grads: tuple[torch.Tensor, ...] | None = None
    samples: list[float] = field(default_factory=list)
    first: float | None = None

    def call(self, proj: Any) -> None:
        if self.kernel is not None:
            proj.kernel = self.kernel
        if not self.backward:
            with torch.no_grad():
                self.forward()
            return
        out = self.forward()
        outs = out if isinstance(out, tuple) else (out,)
        if self.grads is None:  # fixed upstream gradients, made on the (untimed) first call
            self.grads = tuple(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, self.grads)

    def clear(self) -> None:
        for t in self.leaves:
            t.grad = None


def _round_robin(
    variants: Sequence[Variant], proj: Any, *, warmup: int, repeats: int, device: torch.device
) -> None:
    """Time every variant once per round, ``warmup + repeats`` rounds, rotating the order.

    Interleaving spreads any drift of the machine's load (other jobs, thermal state)
    over all variants alike, so their ratios stay fair even when absolute times wander.
    """
    watch = Stopwatch(device)
    for r in range(max(1, warmup) + repeats):
        shift = r % len(variants)
        for v in [*variants[shift:], *variants[:shift]]:
            v.clear()
            watch.start()
            v.call(proj)
            seconds = watch.stop()
            if r == 0:
                v.first = seconds
            if r >= max(1, warmup):
                v.samples.append(seconds)
    proj.kernel = "eager"


def _backend_skip_reason(name: str, device: torch.device) -> str | None:
    from flexproj.kernels.registry import BACKENDS, backend_status

    if name == "auto":
        return None
    if name == "triton" and device.type == "cpu":
        return (
            "n/a on cpu: triton runs on CPU tensors only under TRITON_INTERPRET=1, "
            "an interpreter far too slow to time"
        )
    missing = backend_status().get(name)
    if missing is not None:
        return f"unavailable: {missing}"
    problem = BACKENDS[name].device_problem(device)
    return None if problem is None else f"cannot run on {device.type}: {problem}"


@dataclass
class _Group:
    """The rows and timed variants of one (shape, dtype) group, as they are built."""

    case: Case
    x_leaf: torch.Tensor  # x, requiring grad (the forward + backward variants)
    base: dict[str, Any]  # shape, dtype, batch: the fields every row starts with
    rows: list[dict[str, Any]] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)

    def add(
        self,
        key: tuple[Any, ...],
        forward: Callable[[], Any],
        leaves: Sequence[torch.Tensor],
        kernel: str | None = None,
    ) -> None:
        """Time ``forward`` alone and with backward into ``leaves``."""
        for backward in (False, True):
            self.variants.append(Variant((*key, backward), forward, leaves, backward, kernel))


def _new_group(shape: KernelShape, dtype_name_: str, device: torch.device, batch: int) -> _Group:
    """A seeded FlexProjector and input of one (shape, dtype)."""
    import flexproj

    dtype = DTYPES[dtype_name_]
    torch.manual_seed(0)
    proj = flexproj.FlexProjector(
        shape.in_dim, shape.out_dim, hidden_dim=shape.hidden_dim, kernel="eager"
    ).to(device=device, dtype=dtype)
    H, W = shape.grid
    if shape.packed:
        x = torch.randn(batch * H * W, shape.in_dim, device=device, dtype=dtype)
    else:
        x = torch.randn(batch, H * W, shape.in_dim, device=device, dtype=dtype)
    base = {"shape": shape.name, "dtype": dtype_name_, "batch": batch}
    case = Case(shape, dtype, device, batch, proj, x)
    return _Group(case, x.detach().requires_grad_(True), base)


def _add_stock(group: _Group) -> dict[str, Any]:
    """The stock projector at the native count (one row per group, listed last)."""
    shape, x_leaf = group.case.shape, group.x_leaf
    torch.manual_seed(1)
    stock_module = _stock_module(shape).to(device=group.case.device, dtype=group.case.dtype)
    row: dict[str, Any] = {
        **group.base,
        "tokens": shape.native,
        "n_out": shape.native,
        "grid": None,
        "variant": "stock",
        "kind": "reference",
        "status": "ok",
        "note": f"{shape.stock} at the native count",
    }
    group.add(
        ("stock",), functools.partial(stock_module, x_leaf), [x_leaf, *stock_module.parameters()]
    )
    return row


def _add_floor(group: _Group, row_base: dict[str, Any], n: int) -> dict[str, Any]:
    """The projector's matrix products on the pooled rows, nothing else."""
    case = group.case
    m = case.batch * row_base["n_out"]
    xp = torch.randn(m, case.shape.in_dim, device=case.device, dtype=case.dtype, requires_grad=True)
    u = torch.randn(
        m, case.shape.hidden_dim, device=case.device, dtype=case.dtype, requires_grad=True
    )

    def floor(xp: torch.Tensor = xp, u: torch.Tensor = u, mlp: Any = case.proj.mlp) -> Any:
        return F.linear(xp, mlp.w12.weight, mlp.w12.bias), F.linear(u, mlp.w3.weight, mlp.w3.bias)

    row = {**row_base, "variant": "floor", "kind": "reference", "status": "ok",
           "note": "matrix products only"}  # fmt: skip
    group.add(("floor", n), floor, [xp, u, *case.proj.parameters()])
    group.rows.append(row)
    return row


def _add_backends(
    group: _Group, row_base: dict[str, Any], n: int, grid: tuple[int, int], backends: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """One row per backend at budget ``n``: checked against eager, then timed (a backend
    that cannot run here gets a skipped or error row and is not timed)."""
    from flexproj.kernels.registry import resolve_backend

    case, x_leaf = group.case, group.x_leaf
    proj, params = case.proj, list(case.proj.parameters())
    pool_first = case.pool_first(grid)
    with torch.no_grad():
        proj.kernel = "eager"
        reference = pool_first(case.x).float()
    backend_rows: dict[str, dict[str, Any]] = {}
    for name in backends:
        reason = _backend_skip_reason(name, case.device)
        row: dict[str, Any] = {**row_base, "variant": name, "kind": "backend"}
        group.rows.append(row)
        if reason is not None:
            row.update(status="skipped", reason=reason)
            continue
        proj.kernel = name
        try:  # a backend that cannot run here must not take the others down
            resolved = resolve_backend(name, case.device.type, case.dtype)
            with torch.no_grad():
                err = (pool_first(case.x).float() - reference).abs().max().item()
            pool_first(x_leaf).sum().backward()  # compiles / loads the backward too
        except Exception as exc:
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            continue
        finally:
            proj.kernel = "eager"
        row.update(status="ok", resolves_to=resolved, max_abs_err_vs_eager=err)
        backend_rows[name] = row
        group.add((name, n), functools.partial(pool_first, x_leaf), [x_leaf, *params], kernel=name)
    return backend_rows


def _add_pool_after(
    group: _Group, row_base: dict[str, Any], n: int, grid: tuple[int, int]
) -> dict[str, Any]:
    """LayerNorm + SwiGLU on every native token, then pool (Matryoshka-style)."""
    case, x_leaf = group.case, group.x_leaf
    row = {
        **row_base,
        "variant": "pool-after",
        "kind": "reference",
        "status": "ok",
        "note": f"LayerNorm+SwiGLU (eager) on all {case.shape.grid_tokens} tokens, then pool",
    }
    forward = functools.partial(case.pool_after(grid), x_leaf)
    group.add(("pool-after", n), forward, [x_leaf, *case.proj.parameters()], kernel="eager")
    group.rows.append(row)
    return row


def _bench_group(
    shape: KernelShape,
    dtype_name_: str,
    device: torch.device,
    *,
    tokens: Sequence[int],
    backends: Sequence[str],
    batch: int,
    warmup: int,
    repeats: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """All rows of one (shape, dtype), every variant timed round-robin."""
    torch._dynamo.reset()  # the compile backend starts fresh per group (recompile limit)
    group = _new_group(shape, dtype_name_, device, batch)
    stock_row = _add_stock(group)
    per_n = []
    for n in tokens:
        grid = group.case.proj.output_grid(n, shape.grid)
        row_base = {**group.base, "tokens": n, "grid": list(grid), "n_out": grid[0] * grid[1]}
        floor_row = _add_floor(group, row_base, n)
        backend_rows = _add_backends(group, row_base, n, grid, backends)
        per_n.append((floor_row, backend_rows, _add_pool_after(group, row_base, n, grid)))

    log(f"  timing {len(group.variants)} variants round-robin, {repeats} rounds after warm-up")
    _round_robin(group.variants, group.case.proj, warmup=warmup, repeats=repeats, device=device)
    timings = {
        v.key: summarize(v.samples, warmup=max(1, warmup), first_s=v.first).to_dict()
        for v in group.variants
    }

    def fill(row: dict[str, Any], key: tuple[Any, ...]) -> None:
        row["fwd"], row["fwd_bwd"] = timings[(*key, False)], timings[(*key, True)]
        log(
            f"  {shape.name:<10} {dtype_name_:<4} {row['variant']:<10} N={row['tokens']:<4} "
            f"fwd {row['fwd']['median_ms']:9.2f} ms   fwd+bwd {row['fwd_bwd']['median_ms']:9.2f} ms"
        )

    fill(stock_row, ("stock",))
    for floor_row, backend_rows, after_row in per_n:
        budget = floor_row["tokens"]
        fill(floor_row, ("floor", budget))
        for name, backend_row in backend_rows.items():
            fill(backend_row, (name, budget))
        fill(after_row, ("pool-after", budget))
        _add_ratios(backend_rows, floor_row, stock_row, after_row, shape)
    group.rows.append(stock_row)
    return group.rows


def _median(row: dict[str, Any] | None, mode: str) -> float | None:
    if row is None or row.get("status") != "ok":
        return None
    value = row[mode]["median_ms"]
    return float(value) if value else None


def _add_ratios(
    backend_rows: dict[str, dict[str, Any]],
    floor_row: dict[str, Any],
    stock_row: dict[str, Any],
    after_row: dict[str, Any],
    shape: KernelShape,
) -> None:
    eager = backend_rows.get("eager")
    for row in backend_rows.values():
        row["ratios"] = {
            f"{mode}_{ref}": ratio(_median(row, mode), _median(ref_row, mode))
            for mode in ("fwd", "fwd_bwd")
            for ref, ref_row in (("floor", floor_row), ("eager", eager), ("stock", stock_row))
        }
    after_row["ratios"] = {
        "ideal_pool_first_over_after": round(after_row["n_out"] / shape.grid_tokens, 4),
        **{
            f"{mode}_pool_first_over_after": ratio(_median(eager, mode), _median(after_row, mode))
            for mode in ("fwd", "fwd_bwd")
        },
    }
    floor_row["ratios"] = {
        f"{mode}_stock": ratio(_median(floor_row, mode), _median(stock_row, mode))
        for mode in ("fwd", "fwd_bwd")
    }


# ----------------------------------------------------------------------------- auto check


def auto_check(rows: Sequence[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Which concrete backend was fastest per case, and how ``auto``'s pick compares."""
    from flexproj.kernels.registry import AUTO_CHOICE, resolve_backend

    cases: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["kind"] == "backend" and row["status"] == "ok" and row["variant"] != "auto":
            cases.setdefault((row["shape"], row["dtype"], row["tokens"]), {})[row["variant"]] = row
    out: dict[str, Any] = {"auto_choice": list(AUTO_CHOICE.get(device.type, ())), "cases": []}
    wins: dict[str, dict[str, int]] = {"fwd": {}, "fwd_bwd": {}}
    for (shape, dtype, n), by_name in cases.items():
        pick = resolve_backend("auto", device.type, DTYPES[dtype])
        entry: dict[str, Any] = {"shape": shape, "dtype": dtype, "tokens": n, "auto_picks": pick}
        for mode in ("fwd", "fwd_bwd"):
            timed = {k: _median(r, mode) for k, r in by_name.items()}
            valid = {k: v for k, v in timed.items() if v is not None}
            if not valid:
                continue
            best = min(valid, key=lambda k: valid[k])
            wins[mode][best] = wins[mode].get(best, 0) + 1
            entry[f"{mode}_best"] = best
            entry[f"{mode}_pick_over_best"] = ratio(valid.get(pick), valid[best])
        out["cases"].append(entry)
    out["wins"] = wins
    return out


# ----------------------------------------------------------------------------- markdown


def _cell(row: dict[str, Any], mode: str) -> str:
    if row.get("status") != "ok":
        return "-"
    t = row[mode]
    return fmt_ms(t["median_ms"], t["iqr_ms"])


_GROUP_HEADERS = ["N", "variant", "fwd ms", "×floor", "×eager", "×stock",
                  "fwd+bwd ms", "×floor", "×eager", "×stock"]  # fmt: skip


def _group_row(row: dict[str, Any]) -> list[Any]:
    """One timed row of a (shape, dtype) table: a backend with its three ratios, or a
    reference (the floor is 1.00 against itself; pool-after and stock have no ratios)."""
    r = row.get("ratios", {})
    n = f"{row['tokens']}" + (f" ({row['n_out']})" if row["n_out"] != row["tokens"] else "")
    variant = row["variant"]
    cells = []
    for mode in ("fwd", "fwd_bwd"):
        if row["kind"] == "backend":
            refs = [fmt_ratio(r.get(f"{mode}_{ref}")) for ref in ("floor", "eager", "stock")]
        elif variant == "floor":
            refs = ["1.00", "-", fmt_ratio(r.get(f"{mode}_stock"))]
        else:
            refs = ["-", "-", "-"]
        cells += [_cell(row, mode), *refs]
    if variant == "auto":
        variant = f"auto (= {row.get('resolves_to')})"
    return [n, variant, *cells]


def _group_tables(payload: dict[str, Any], skipped: dict[str, str]) -> list[str]:
    """A table per (shape, dtype); rows that did not run go to ``skipped`` instead."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in payload["rows"]:
        groups.setdefault((row["shape"], row["dtype"]), []).append(row)
    parts = []
    for (shape_name, dtype), group in groups.items():
        note = payload["shapes"][shape_name]["note"]
        table = []
        for row in group:
            if row["status"] != "ok":
                skipped[row["variant"]] = row.get("reason", "")
            else:
                table.append(_group_row(row))
        parts += [f"### {shape_name}, {dtype}", "", f"{note}.", ""]
        parts += [markdown_table(_GROUP_HEADERS, table), ""]
    return parts


def _pool_after_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    table = [
        [
            row["shape"],
            row["dtype"],
            row["tokens"],
            fmt_ratio(row["ratios"]["ideal_pool_first_over_after"]),
            _cell(row, "fwd"),
            fmt_ratio(row["ratios"].get("fwd_pool_first_over_after")),
            _cell(row, "fwd_bwd"),
            fmt_ratio(row["ratios"].get("fwd_bwd_pool_first_over_after")),
        ]
        for row in rows
        if row["variant"] == "pool-after" and row["status"] == "ok"
    ]
    if not table:
        return []
    headers = ["shape", "dtype", "N", "ideal N/L", "pool-after fwd ms", "pool-first/after fwd",
               "pool-after fwd+bwd ms", "pool-first/after fwd+bwd"]  # fmt: skip
    title = "### Pool-first (ours) vs pool-after (Matryoshka-style: project every token, then pool)"
    return [title, "", markdown_table(headers, table), ""]


def _auto_check_section(payload: dict[str, Any]) -> list[str]:
    check = payload.get("auto_check", {})
    if not check.get("cases"):
        return []
    win_text = "; ".join(
        f"{mode}: " + ", ".join(f"{k} {v}" for k, v in sorted(w.items()))
        for mode, w in check["wins"].items()
    )
    headers = ["shape", "dtype", "N", "auto picks", "best fwd", "pick/best", "best fwd+bwd",
               "pick/best"]  # fmt: skip
    table = [
        [c["shape"], c["dtype"], c["tokens"], c["auto_picks"],
         c.get("fwd_best", "-"), fmt_ratio(c.get("fwd_pick_over_best")),
         c.get("fwd_bwd_best", "-"), fmt_ratio(c.get("fwd_bwd_pick_over_best"))]
        for c in check["cases"]
    ]  # fmt: skip
    return [
        "### auto check",
        "",
        f"AUTO_CHOICE[{payload['environment']['device']!r}] = {tuple(check['auto_choice'])}. "
        f"Fastest concrete backend per case (wins): {win_text}.",
        "",
        markdown_table(headers, table),
        "",
    ]


def to_markdown(payload: dict[str, Any]) -> str:
    config = payload["config"]
    parts = [
        "## flexproj bench kernels",
        "",
        environment_markdown(payload["environment"]),
        f"- batch {config['batch']} images, warm-up {config['warmup']}, "
        f"repeats {config['repeats']}; times are medians ±IQR in ms; "
        "fwd under no_grad, fwd+bwd with input and weights requiring grad",
        "- ×floor: time / matrix products alone at the same N; ×eager: time / eager "
        "backend at the same N; ×stock: time / stock projector at the native count",
        "",
    ]
    skipped: dict[str, str] = {}
    parts += _group_tables(payload, skipped)
    parts += _pool_after_section(payload["rows"])
    parts += _auto_check_section(payload)
    if skipped:
        parts += ["Skipped backends:", ""]
        parts += [f"- {name}: {reason}" for name, reason in skipped.items()]
        parts.append("")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- entry points


def run_kernels(
    *,
    shapes: Sequence[str] = tuple(SHAPES),
    tokens: Sequence[int] = DEFAULT_TOKENS,
    dtypes: Sequence[str] = ("fp32", "bf16"),
    backends: Sequence[str] = BACKEND_ORDER,
    batch: int = 8,
    device: str | None = None,
    quick: bool = False,
    warmup: int | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the kernel bench; returns the JSON payload (``rows``, ``environment`` ...)."""
    set_threads(threads)
    dev = pick_device(device)
    env = environment(dev, dtypes)  # at the start: date and load average before the work
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ConfigError(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    bad = [b for b in backends if b not in BACKEND_ORDER]
    if bad:
        raise ConfigError(f"unknown backend(s) {bad}; choose from {list(BACKEND_ORDER)}")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ConfigError(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    if quick:
        batch = min(batch, 2)
    warmup = 1 if warmup is None else warmup
    repeats = (2 if quick else 5) if repeats is None else repeats
    chosen = [SHAPES[s].quick() if quick else SHAPES[s] for s in shapes]
    rows: list[dict[str, Any]] = []
    for shape in chosen:
        usable = [n for n in tokens if n <= shape.grid_tokens]
        for dt in dtypes:
            log(f"[kernels] {shape.name} {dt} batch={batch} tokens={usable}")
            rows += _bench_group(
                shape,
                dt,
                dev,
                tokens=usable,
                backends=backends,
                batch=batch,
                warmup=warmup,
                repeats=repeats,
                log=log,
            )
    payload: dict[str, Any] = {
        "bench": "kernels",
        "environment": env,
        "config": {
            "shapes": list(shapes),
            "tokens": list(tokens),
            "dtypes": list(dtypes),
            "backends": list(backends),
            "batch": batch,
            "quick": quick,
            "warmup": warmup,
            "repeats": repeats,
        },
        "shapes": {s.name: {**asdict(s), "quick": quick} for s in chosen},
        "rows": rows,
    }
    payload["auto_check"] = auto_check(rows, dev)
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="projector shapes"
    )
    parser.add_argument(
        "--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS), help="budgets N"
    )
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument(
        "--backends", nargs="+", default=list(BACKEND_ORDER), choices=list(BACKEND_ORDER)
    )
    parser.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny widths, batch <= 2, 2 repeats: seconds"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 1)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls (default 5; --quick 2)"
    )
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    return run_bench(args, run_kernels, to_markdown)
