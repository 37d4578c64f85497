"""Checkpoint files: permissions, a consistent pair after a failed save, and loading that
refuses malformed, tampered or non-finite checkpoints with CheckpointError only."""

import os
import stat

import pytest

import flexproj
from flexproj.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from flexproj.testing import tiny_vlm


@pytest.fixture(scope="module")
def patched():
    model, _ = tiny_vlm("llava")
    flexproj.patch(model, tokens=16)
    return model


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_files_get_the_mode_a_plain_write_gets(patched, tmp_path, umask):
    old = os.umask(umask)
    try:
        directory = flexproj.save_pretrained(patched, tmp_path / "ckpt")
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(old)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert stat.S_IMODE((directory / name).stat().st_mode) == expected, name
