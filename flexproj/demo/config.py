"""What a demo run depends on: the conversion experiment's :class:`ConvertConfig` (the
default; per family :data:`FAMILY_SETUPS`, per question task :data:`TASKS`, its table rows
:data:`ROW_LABELS`) and the from-scratch experiment's :class:`DemoConfig`.

Everything here is written into ``results.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flexproj.schedule import TokenSchedule
from flexproj.testing.datasets import KINDS

__all__ = [
    "FAMILY_SETUPS",
    "PROMPTS",
    "ROW_LABELS",
    "TASKS",
    "ConvertConfig",
    "DemoConfig",
    "quick_config",
    "quick_convert_config",
    "row_label",
]


PROMPTS = {
    "image_first": "USER: <image>\n{question} ASSISTANT: {answer}",  # LLaVA-1.5's layout
    "question_first": "USER: {question} <image> ASSISTANT: {answer}",
}


@dataclass
class DemoConfig:
    """Everything a demo run depends on (written into ``results.json``)."""

    # geometry: 96 px / 8 px patches = 12x12 = 144 native tokens (LLaVA-1.5: 24x24 = 576)
    image_size: int = 96
    patch_size: int = 8
    board: int = 4  # position questions name a cell of a board x board grid (24 px cells)
    kinds: tuple[str, ...] = ("colour", "position")  # "count" too: see docs/DEMO.md
    prompt: str = "question_first"  # or "image_first" (LLaVA-1.5's layout; see PROMPTS)
    # training budgets and the flexible schedule's weights (paper: 64/144/256, 2:3:5)
    train_tokens: tuple[int, ...] = (16, 36, 64)
    flex_weights: tuple[float, ...] = (2.0, 3.0, 5.0)
    # evaluation budgets: the training ones, and ones no model trained on
    eval_tokens: tuple[int, ...] = (4, 9, 16, 25, 36, 49, 64, 100, 144)
    # model: a 2-layer LLM trained from scratch, a frozen 1-layer CLIP tower
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    #: None: the tiny text config's head_dim (16, though width / heads = 32); 32 gives a
    #: model vLLM's CPU attention serves (it rejects head_dim 16)
    text_head_dim: int | None = None
    rope_theta: float = 100.0  # prompts are ~20-170 tokens long, not thousands
    vision_hidden: int = 32  # the conversion experiment's base model: 64 (CONVERT_VISION)
    vision_heads: int = 4
    vision_layers: int = 1
    vision_pos: str = "sincos"  # "sincos": fixed 2-D sin-cos position embeddings; "random"
    train_vision: bool = False
    # optimisation (identical for every run)
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # evaluation
    eval_per_kind: int = 200
    eval_batch_size: int = 100
    eval_seed: int = 1_000_003  # held out: training streams use seeds 0, 1, 2, ...
    prefill_repeats: int = 7
    # repetition
    seeds: int = 3
    threads: int | None = None

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.train_tokens = tuple(self.train_tokens)
        self.flex_weights = tuple(self.flex_weights)
        native = self.native_tokens
        self.eval_tokens = tuple(sorted({*self.eval_tokens, *self.train_tokens}))
        for n in (*self.train_tokens, *self.eval_tokens):
            if not 0 < n <= native:
                raise ValueError(f"budget {n} is outside 1..{native} (the native grid)")
        if len(self.flex_weights) != len(self.train_tokens):
            raise ValueError("one flexible-schedule weight per training budget")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown question kinds {sorted(unknown)}; choose from {KINDS}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {sorted(PROMPTS)}, got {self.prompt!r}")
        if self.seeds < 1 or self.steps < 1:
            raise ValueError("seeds and steps must be at least 1")

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def native_tokens(self) -> int:
        return self.grid_side**2

    def schedules(self, seed: int) -> dict[str, TokenSchedule]:
        """The training runs of one seed: one per fixed budget, then the flexible one."""
        runs = {f"fixed-{n}": TokenSchedule.fixed(n, seed=seed) for n in self.train_tokens}
        ratio = ":".join(f"{w:g}" for w in self.flex_weights)
        runs[f"flex {ratio}"] = TokenSchedule(self.train_tokens, self.flex_weights, seed=seed)
        return runs


def quick_config(**overrides: Any) -> DemoConfig:
    """About a minute on two cores: fewer steps, fewer budgets, a small eval set."""
    base: dict[str, Any] = {
        "steps": 120,
        "batch_size": 16,
        "eval_per_kind": 16,
        "eval_batch_size": 32,
        "eval_tokens": (4, 16, 36, 64, 144),
        "seeds": 1,
        "prefill_repeats": 2,
        "warmup_steps": 5,
    }
    base.update(overrides)
    return DemoConfig(**base)


#: per family: recipe, tiny model, image size (the board's cells must be resolvable at the
#: native grid), native tokens, training budgets (the paper's 1/9, 1/4, 4/9 of the native
#: grid where the grid allows) and evaluation budgets
FAMILY_SETUPS: dict[str, dict[str, Any]] = {
    "llava": {
        "recipe": "llava",
        "image_size": 96,
        "native": 144,
        "train_tokens": (16, 36, 64),
        "eval_tokens": (4, 9, 16, 25, 36, 49, 64, 100, 144),
    },
    "qwen2_5_vl": {
        "recipe": "qwen_vl",
        "image_size": 96,
        "native": 36,  # 96 px: 12x12 patches, 6x6 merged units
        "train_tokens": (4, 9, 16),
        "eval_tokens": (1, 4, 9, 16, 25, 36),
    },
    "internvl": {
        "recipe": "internvl",
        "image_size": 64,
        "native": 16,  # one 64 px tile: 8x8 ViT grid, 4x4 after pixel shuffle
        "train_tokens": (1, 4, 9),
        "eval_tokens": (1, 4, 9, 16),
    },
}

#: question tasks: the kinds asked (in turn) and the board their images are drawn on
TASKS: dict[str, dict[str, Any]] = {
    # a big shape's colour (survives pooling) and the top colour of a two-colour flag on a
    # 6x6 board (16 px cells at 96 px: one token per cell at 36 tokens, where the two halves
    # average into one token: fine detail)
    "flag": {"kinds": ("colour", "flag"), "board": 6},
    # a big shape's colour and the colour in a named cell of a 4x4 board (the earlier demo)
    "board": {"kinds": ("colour", "position"), "board": 4},
}

ROW_LABELS = {
    "stock": "stock (native budget)",
    "pool_after": "stock + pool-after, no training",
    "distilled": "distilled FlexProjector, no LLM training",
    "tokenflex_align": "TokenFLEX: distilled + flex recipe (align)",
    "tokenflex_finetune": "TokenFLEX: distilled + flex recipe (finetune)",
    "tokenflex_per_sample": "TokenFLEX, one budget per sample: distilled + flex recipe (align)",
    "pool_after_flex": "pool-after + flex recipe (align)",
}


@dataclass
class ConvertConfig:
    """Everything the conversion run depends on (written into ``results.json``)."""

    family: str = "llava"
    # the stock reference: projector + LLM trained at the native budget from a random init
    # (the default run: about 4m20s on 2 CPU cores, docs/DEMO.md)
    stock_steps: int = 400
    stock_lr: float = 3e-3
    # conversion: K optimiser steps per recipe row (a fraction of the stock training)
    convert_steps: int = 80  # 20% of the stock training
    align_lr: float = 3e-3
    finetune_lr: float = 1e-3
    distill_steps: int = 50
    distill_lr: float = 3e-3
    batch_size: int = 24
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    flex_weights: tuple[float, ...] = (2.0, 3.0, 5.0)
    # None: the family's (FAMILY_SETUPS)
    train_tokens: tuple[int, ...] | None = None
    eval_tokens: tuple[int, ...] | None = None
    image_size: int | None = None
    #: the question task (TASKS): "flag" (default; fine detail) or "board"
    task: str = "flag"
    eval_per_kind: int = 100
    eval_batch_size: int = 100
    eval_seed: int = 1_000_003
    data_seed: int = 7
    #: the LLaVA base model's attention head width (None: 16, what the published tables used;
    #: 32 for a base model vLLM's CPU backend serves: `flexproj demo --text-head-dim 32`)
    text_head_dim: int | None = None
    seeds: int = 3
    # torch threads per task: one (two one-thread workers beat one two-thread process on
    # these tiny tensors, and a busy machine punishes oversubscription hard)
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.family not in FAMILY_SETUPS:
            raise ValueError(f"family must be one of {sorted(FAMILY_SETUPS)}, got {self.family!r}")
        setup = FAMILY_SETUPS[self.family]
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        self.flex_weights = tuple(self.flex_weights)
        self.train_tokens = tuple(self.train_tokens or setup["train_tokens"])
        self.image_size = self.image_size or setup["image_size"]
        native = self.native_tokens
        self.eval_tokens = tuple(
            sorted({*(self.eval_tokens or setup["eval_tokens"]), *self.train_tokens, native})
        )
        for n in self.eval_tokens:
            if not 0 < n <= native:
                raise ValueError(f"budget {n} is outside 1..{native} (the native grid)")
        if len(self.flex_weights) != len(self.train_tokens):
            raise ValueError("one flexible-schedule weight per training budget")
        if self.seeds < 1 or min(self.stock_steps, self.convert_steps, self.distill_steps) < 1:
            raise ValueError("seeds and steps must be at least 1")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(TASKS[self.task]["kinds"])

    @property
    def board(self) -> int:
        return int(TASKS[self.task]["board"])

    @property
    def native_tokens(self) -> int:
        return int(FAMILY_SETUPS[self.family]["native"])

    @property
    def recipe(self) -> str:
        return str(FAMILY_SETUPS[self.family]["recipe"])

    @property
    def flex_schedule(self) -> str:
        return ",".join(
            f"{n}:{w:g}" for n, w in zip(self.train_tokens or (), self.flex_weights, strict=True)
        )

    def rows(self) -> list[str]:
        """Table rows, in order (fixed-N: one per training budget)."""
        fixed = [f"fixed_{n}" for n in self.train_tokens or ()]
        return [*ROW_LABELS, *fixed]


def quick_convert_config(**overrides: Any) -> ConvertConfig:
    """A smoke run (tests): few steps, a small eval set, one seed."""
    base: dict[str, Any] = {
        "stock_steps": 30,
        "convert_steps": 8,
        "distill_steps": 6,
        "batch_size": 8,
        "eval_per_kind": 8,
        "eval_batch_size": 16,
        "seeds": 1,
    }
    base.update(overrides)
    return ConvertConfig(**base)


def row_label(row: str) -> str:
    if row.startswith("fixed_"):
        return f"fixed-{row.removeprefix('fixed_')}: distilled + fixed recipe (align)"
    return ROW_LABELS[row]
