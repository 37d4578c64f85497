"""The synthetic VQA generator writes valid LLaVA-format data."""

import json
import random

import pytest
from PIL import Image

from flexproj.testing.datasets import KINDS, VOCAB, make_sample, make_samples, write_llava_dataset


def test_samples_are_reproducible_and_cover_kinds():
    a, b = make_samples(9, seed=3), make_samples(9, seed=3)
    assert [s.question for s in a] == [s.question for s in b]
    assert [s.answer for s in a] == [s.answer for s in b]
    assert a[0].image.tobytes() == b[0].image.tobytes()
    assert {s.kind for s in a} == set(KINDS) - {"flag"}
    for s in a:
        assert set(s.question.split()) <= set(VOCAB) and s.answer in VOCAB


def test_large_shape_colour_is_visible_in_the_centre():
    s = make_sample(random.Random(0), "colour")
    from flexproj.testing.datasets import COLOURS

    assert s.image.getpixel((32, 40)) == COLOURS[s.answer]


def test_write_llava_dataset(tmp_path):
    path = write_llava_dataset(make_samples(4, seed=0), tmp_path)
    records = json.loads(path.read_text())
    assert len(records) == 4
    for rec in records:
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"] in VOCAB
        assert Image.open(tmp_path / rec["image"]).size == (64, 64)


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown question kind"):
        make_sample(random.Random(0), "texture")


def test_flag_top_colour_is_the_answer_and_the_bottom_differs():
    from flexproj.testing.datasets import COLOURS

    rng = random.Random(0)
    for _ in range(20):
        s = make_sample(rng, "flag", 96, 6)
        assert s.question == "what color is the top of the flag ?"
        pixels = s.image.load()
        # the flag fills one 16 px cell: find it, then read its top and bottom halves
        cells = [
            (r, c)
            for r in range(6)
            for c in range(6)
            if pixels[c * 16 + 8, r * 16 + 4] != (245, 245, 245)
        ]
        assert len(cells) == 1
        r, c = cells[0]
        top, bottom = pixels[c * 16 + 8, r * 16 + 3], pixels[c * 16 + 8, r * 16 + 12]
        assert top == COLOURS[s.answer] and bottom != top and bottom in COLOURS.values()


def test_make_samples_default_kinds_leave_the_flag_out():
    assert {s.kind for s in make_samples(12, seed=1)} == {"colour", "count", "position"}
    assert {s.kind for s in make_samples(4, seed=1, kinds=KINDS)} == set(KINDS)
