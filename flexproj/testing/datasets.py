"""Synthetic visual question answering in the LLaVA conversation format.

Images are coloured shapes on a ``grid x grid`` board. Questions need spatial
detail to different degrees, so that the number of vision tokens matters:

* ``colour``   "what color is the large shape ?" (one big shape: survives heavy pooling)
* ``count``    "how many red shapes are there ?" (small shapes; counts blur when pooled)
* ``position`` "what color is the shape in row two column three ?" (one cell: needs a
  fine grid)
* ``flag``     "what color is the top of the flag ?" (a two-colour flag, one colour above
  the other, on a board of ``grid x grid`` cells; at a grid of one token per cell the two
  halves average into one token and which colour is on top is lost: fine detail)

Answers are one word. :func:`write_llava_dataset` writes PNGs plus a JSON list of
``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": ...}], "kind"}`` records, the format the recipes read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
KINDS = ("colour", "count", "position", "flag")
#: the kinds ``make_samples`` cycles through by default (``flag`` is asked for by name)
BOARD_KINDS = ("colour", "count", "position")
#: every word the questions and answers use (for tokenizers built in code)
VOCAB: tuple[str, ...] = (
    *COLOURS,
    *SHAPES,
    *NUMBER_WORDS,
    "none",
    "what",
    "color",
    "is",
    "the",
    "large",
    "shape",
    "how",
    "many",
    "shapes",
    "are",
    "there",
    "in",
    "row",
    "column",
    "top",
    "of",
    "flag",
    "?",
)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[int, int, int, int],
    fill: tuple[int, int, int],
) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_sample(rng: random.Random, kind: str, image_size: int = 64, grid: int = 4) -> Sample:
    """One image and question of ``kind`` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose from {KINDS}")
    image = Image.new("RGB", (image_size, image_size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    colours = list(COLOURS)
    if kind == "colour":
        colour = rng.choice(colours)
        margin = image_size // 6
        _draw_shape(
            draw,
            rng.choice(SHAPES),
            (margin, margin, image_size - margin, image_size - margin),
            COLOURS[colour],
        )
        return Sample(image, "what color is the large shape ?", colour, kind)
    cell = image_size / grid
    if kind == "flag":
        top, bottom = rng.sample(colours, 2)
        r, c = rng.randrange(grid), rng.randrange(grid)
        x0, y0, x1, y1 = int(c * cell), int(r * cell), int((c + 1) * cell), int((r + 1) * cell)
        mid = (y0 + y1) // 2
        draw.rectangle((x0, y0, x1 - 1, mid - 1), fill=COLOURS[top])
        draw.rectangle((x0, mid, x1 - 1, y1 - 1), fill=COLOURS[bottom])
        return Sample(image, "what color is the top of the flag ?", top, kind)
    pad = max(1, int(cell * 0.15))
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    filled = rng.sample(cells, rng.randint(1, min(len(cells), 6)))
    placed: dict[tuple[int, int], str] = {}
    for r, c in filled:
        colour = rng.choice(colours)
        placed[(r, c)] = colour
        box = (
            int(c * cell) + pad,
            int(r * cell) + pad,
            int((c + 1) * cell) - pad,
            int((r + 1) * cell) - pad,
        )
        _draw_shape(draw, rng.choice(SHAPES), box, COLOURS[colour])
    if kind == "count":
        colour = rng.choice(sorted(set(placed.values())) if rng.random() < 0.8 else colours)
        count = sum(v == colour for v in placed.values())
        return Sample(image, f"how many {colour} shapes are there ?", NUMBER_WORDS[count], kind)
    r, c = rng.choice(filled) if rng.random() < 0.8 else rng.choice(cells)
    answer = placed.get((r, c), "none")
    question = (
        f"what color is the shape in row {NUMBER_WORDS[r + 1]} column {NUMBER_WORDS[c + 1]} ?"
    )
    return Sample(image, question, answer, kind)


def make_samples(
    n: int,
    seed: int = 0,
    *,
    kinds: Sequence[str] = BOARD_KINDS,
    image_size: int = 64,
    grid: int = 4,
) -> list[Sample]:
    """``n`` samples cycling through ``kinds``, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [make_sample(rng, kinds[i % len(kinds)], image_size, grid) for i in range(n)]


def write_llava_dataset(
    samples: Sequence[Sample],
    out_dir: str | Path,
    name: str = "data.json",
    image_token: str = "<image>",
    *,
    prefix: str = "",
    question_first: bool = False,
) -> Path:
    """Write PNGs under ``out_dir/images`` and the LLaVA JSON; returns the JSON path.

    ``prefix`` starts every id and image name (several splits in one folder);
    ``question_first``: ``"{question} {image_token}"`` instead of LLaVA's image-first turn."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, sample in enumerate(samples):
        rel = f"images/{prefix}{i:06d}.png"
        sample.image.save(out / rel)
        human = (
            f"{sample.question} {image_token}"
            if question_first
            else f"{image_token}\n{sample.question}"
        )
        records.append(
            {
                "id": f"{prefix}{i:06d}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": human},
                    {"from": "gpt", "value": sample.answer},
                ],
                "kind": sample.kind,
            }
        )
    path = out / name
    path.write_text(json.dumps(records, indent=1))
    return path
