"""ZeRO-3 set-up errors, said before the model loads (one process; the two-process
ZeRO-3 vs DDP runs are in tests_deepspeed/, ``make test-zero3``)."""

import json

import pytest

from flexproj.recipes.trainer import main
from flexproj.testing.datasets import make_samples, write_llava_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_dataset(make_samples(4, seed=0), tmp_path_factory.mktemp("data"))


def _args(data, out, *extra):
    return ["--model", "tiny:llava", "--data", str(data), "--output_dir", str(out),
            "--max_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", *extra]  # fmt: skip


def _zero3_config(tmp_path, **zero):
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({
        "zero_optimization": {"stage": 3, **zero},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
    }))  # fmt: skip
    return config


def test_zero3_without_gathered_saves_fails_before_the_model_loads(data, tmp_path, capsys):
    """Without ``stage3_gather_16bit_weights_on_model_save`` the projector could only be
    saved from one rank's shard: one error line before anything loads or trains."""
    config = _zero3_config(tmp_path)
    code = main("llava", _args(data, tmp_path / "out", "--deepspeed", str(config)))
    err = capsys.readouterr().err
    assert code == 2
    assert "stage3_gather_16bit_weights_on_model_save" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "recipe.json").exists()


def test_zero3_refuses_distill_warm_start(data, tmp_path, capsys):
    config = _zero3_config(tmp_path, stage3_gather_16bit_weights_on_model_save=True)
    argv = _args(data, tmp_path / "out", "--deepspeed", str(config),
                 "--init", "distill")  # fmt: skip
    assert main("llava", argv) == 2
    assert "--init distill" in capsys.readouterr().err
