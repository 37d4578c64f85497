"""Every command's errors: one line on stderr and exit status 2, through the one wrapper
(flexproj.cli.run_command), never a traceback; run as the installed command would be."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import flexproj
from flexproj.testing import tiny_images, tiny_vlm


def flexproj_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flexproj.cli", *args], capture_output=True, text=True, timeout=600
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    model, processor = tiny_vlm("llava")
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    flexproj.patch(model, processor, tokens=9)
    flexproj.save_pretrained(model, root / "proj")
    return root


def test_export_errors_are_one_line(llava_dirs, tmp_path):
    base, proj = str(llava_dirs / "base"), str(llava_dirs / "proj")
    assert_one_line_error(
        flexproj_cli("export", base, str(tmp_path / "nothing"), str(tmp_path / "o")), "nothing"
    )
    assert_one_line_error(
        flexproj_cli("export", str(tmp_path / "nobase"), proj, str(tmp_path / "o")), "nobase"
    )
    (tmp_path / "exists").mkdir()
    assert_one_line_error(flexproj_cli("export", base, proj, str(tmp_path / "exists")), "exists")
    # the tiny LLaVA's native count is 64 tokens per image: a default above it is refused
    result = flexproj_cli("export", base, proj, str(tmp_path / "big"), "--tokens", "100000")
    assert_one_line_error(result, "100000", "native 64")
    assert not (tmp_path / "big").exists()


def test_train_with_an_unknown_flag_is_one_line(tmp_path):
    data = tmp_path / "data.json"
    data.write_text("[]")
    result = flexproj_cli(
        "train", "llava", "--model", "tiny:llava", "--data", str(data),
        "--output_dir", str(tmp_path / "out"), "--no_such_flag", "1",
    )  # fmt: skip
    assert_one_line_error(result, "--no_such_flag")


def test_distill_errors_are_one_line(llava_dirs, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    tiny_images([(64, 64)])[0].save(images / "ok.png")
    (images / "broken.png").write_bytes(b"not a png")
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([str(images / "ok.png"), str(images / "missing.png")]))
    common = [
        "--steps",
        "1",
        "--batch_size",
        "1",
        "--no_progress",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert_one_line_error(
        flexproj_cli("distill", "--model", "tiny:llava", "--images", str(images), *common)
    )
    assert_one_line_error(
        flexproj_cli("distill", "--model", "tiny:llava", "--images", str(listing), *common),
        "missing.png",
    )
    assert_one_line_error(
        flexproj_cli(
            "distill", "--model", str(tmp_path / "no_model"), "--images", str(images), *common
        ),
        "no_model",
    )
