"""Checkpoint files: permissions, a consistent pair after a failed save, and loading that
refuses malformed, tampered or non-finite checkpoints with CheckpointError only."""

import json
import os
import stat

import pytest
from safetensors import safe_open

import flexproj
import flexproj.checkpoint
from flexproj.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from flexproj.patching import get_state
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


def stored_config(directory):
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        return json.loads(f.metadata()["flexproj_config"])


def test_a_save_failing_between_the_moves_never_pairs_weights_with_another_json(
    tmp_path, monkeypatch
):
    directory = tmp_path / "ckpt"
    first, _ = tiny_vlm("llava", seed=1)
    flexproj.patch(first, tokens=16)
    flexproj.save_pretrained(first, directory)
    second, _ = tiny_vlm("llava", seed=2)
    flexproj.patch(second, tokens=4)

    real_replace, calls = os.replace, []

    def replace_failing_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(flexproj.checkpoint.os, "replace", replace_failing_second)
    with pytest.raises(OSError, match="disk full"):
        flexproj.save_pretrained(second, directory)
    monkeypatch.undo()

    assert len(calls) == 2
    weights_config = stored_config(directory)
    assert weights_config["default_tokens"] == 4  # the new weights are in place
    json_file = directory / CONFIG_NAME
    if json_file.exists():  # whatever JSON there is describes these weights
        assert json.loads(json_file.read_text()) == weights_config
    assert sorted(p.name for p in directory.iterdir()) == [WEIGHTS_NAME]  # no temp files
    fresh, _ = tiny_vlm("llava")
    flexproj.from_pretrained(fresh, directory)
    assert get_state(fresh).projector.mlp.w3.weight.equal(get_state(second).projector.mlp.w3.weight)
    # saving again restores the pair
    flexproj.save_pretrained(second, directory)
    assert json.loads(json_file.read_text()) == stored_config(directory)
