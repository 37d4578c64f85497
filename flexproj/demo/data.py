"""Step 1 of :func:`flexproj.demo.run_convert`: the synthetic VQA data on disk (LLaVA JSON +
PNGs, question first), one training split for the stock model and the conversion rows
and one held-out evaluation split."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from flexproj.demo.config import ConvertConfig
from flexproj.testing.datasets import Sample, make_sample, write_llava_dataset

__all__ = ["write_convert_data"]


def _write_split(samples: Sequence[Sample], out: Path, name: str, prefix: str) -> Path:
    """PNGs + LLaVA JSON, question first (``"{question} <image>"``: see docs/DEMO.md)."""
    return write_llava_dataset(samples, out, name, prefix=prefix, question_first=True)


def write_convert_data(cfg: ConvertConfig, out: Path) -> tuple[Path, Path]:
    """Training data (one fresh sample per image of the stock training; the conversion rows
    read its first K steps' worth) and the held-out evaluation set."""
    assert cfg.image_size is not None
    size, board = cfg.image_size, cfg.board
    rng = random.Random(f"convert-train:{cfg.data_seed}")
    kinds = cfg.kinds
    train = [
        make_sample(rng, kinds[i % len(kinds)], size, board)
        for i in range(cfg.stock_steps * cfg.batch_size)
    ]
    rng = random.Random(f"convert-eval:{cfg.eval_seed}")
    held_out = [
        make_sample(rng, kind, size, board) for _ in range(cfg.eval_per_kind) for kind in kinds
    ]
    return _write_split(train, out, "train.json", "t"), _write_split(
        held_out, out, "eval.json", "e"
    )
