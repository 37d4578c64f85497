"""Checkpoint files: permissions, a consistent pair after a failed save, and loading that
refuses malformed, tampered or non-finite checkpoints with CheckpointError only."""

import json
import os
import stat
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import flexproj
import flexproj.checkpoint
from flexproj.checkpoint import CONFIG_KEY, CONFIG_NAME, HASH_KEY, WEIGHTS_NAME, content_hash
from flexproj.testing import tiny_images, tiny_vlm


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
    assert flexproj.get_projector(fresh).mlp.w3.weight.equal(
        flexproj.get_projector(second).mlp.w3.weight
    )
    # saving again restores the pair
    flexproj.save_pretrained(second, directory)
    assert json.loads(json_file.read_text()) == stored_config(directory)


# --- malformed and tampered checkpoints --------------------------------------------


class Original:
    """One good checkpoint: its config text, tensors and raw file bytes."""

    def __init__(self, text, tensors, raw):
        self.text, self.tensors, self.raw = text, tensors, raw

    def __iter__(self):
        return iter((self.text, self.tensors, self.raw))

    def __repr__(self):  # keep failure reports readable
        return f"Original({len(self.raw)} bytes)"


@pytest.fixture(scope="module")
def original(patched, tmp_path_factory):
    directory = flexproj.save_pretrained(patched, tmp_path_factory.mktemp("good"))
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        text = f.metadata()[CONFIG_KEY]
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return Original(text, tensors, (directory / WEIGHTS_NAME).read_bytes())


def write_checkpoint(directory, text, tensors, hash_policy="recompute", stale_text=None):
    """A checkpoint whose metadata holds ``text``; its hash recomputed, kept from
    ``stale_text`` (as a hand edit of the metadata leaves it), or dropped."""
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {CONFIG_KEY: text}
    if hash_policy == "recompute":
        metadata[HASH_KEY] = content_hash(text, tensors)
    elif hash_policy == "stale":
        metadata[HASH_KEY] = content_hash(stale_text, tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
    return directory


def load(directory):
    model, _ = tiny_vlm("llava")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the no-hash warning
        return flexproj.from_pretrained(model, directory)


@pytest.mark.parametrize("hash_policy", ["recompute", "drop"])
def test_a_wrongly_typed_field_is_named(original, tmp_path, hash_policy):
    text, tensors, _ = original
    config = json.loads(text)
    config["projector"]["in_dim"] = "32"
    directory = write_checkpoint(tmp_path, json.dumps(config), tensors, hash_policy)
    with pytest.raises(
        flexproj.CheckpointError, match=r"projector\.in_dim must be a positive int, got '32'"
    ):
        load(directory)


def test_a_checkpoint_without_a_hash_loads_with_a_warning(original, tmp_path):
    text, tensors, _ = original
    directory = write_checkpoint(tmp_path, text, tensors, "drop")
    model, _ = tiny_vlm("llava")
    with pytest.warns(UserWarning, match="no content hash"):
        flexproj.from_pretrained(model, directory)
    assert flexproj.get_projector(model).mlp.w12.weight.equal(tensors["mlp.w12.weight"])


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [("projector", "eps", 1e-3), ("projector", "eps", 0.5), (None, "default_tokens", 4)],
)
def test_an_edited_config_fails_the_hash(original, tmp_path, section, field, value):
    text, tensors, _ = original
    config = json.loads(text)
    (config[section] if section else config)[field] = value
    edited = json.dumps(config, indent=2, sort_keys=True)
    directory = write_checkpoint(tmp_path, edited, tensors, "stale", stale_text=text)
    with pytest.raises(flexproj.CheckpointError, match="does not match the content hash"):
        load(directory)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(original, tmp_path, bad):
    text, tensors, _ = original
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["mlp.w3.weight"][0, 0] = bad
    directory = write_checkpoint(tmp_path, text, tensors, "recompute")
    with pytest.raises(flexproj.CheckpointError, match=r"'mlp\.w3\.weight' holds NaN or infinite"):
        load(directory)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
PROJECTOR_KEYS = ["in_dim", "out_dim", "hidden_dim", "bias", "eps", "extra"]
SCHEDULE_KEYS = ["tokens", "weights", "seed", "per_sample", "extra"]
TOP_KEYS = [
    "format",
    "flexproj_version",
    "model_type",
    "adapter",
    "projector",
    "pooling",
    "default_tokens",
    "native_tokens",
    "token_schedule",
]


@st.composite
def tampered_configs(draw, config):
    """The config text with one or more fields replaced, deleted or added, or replaced
    by arbitrary text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=40) | st.just(json.dumps(config)[:-1]))
    config = json.loads(json.dumps(config))
    if config.get("token_schedule") is None and draw(st.booleans()):
        config["token_schedule"] = {"tokens": [4, 16], "weights": [1, 1], "seed": 0,
                                    "per_sample": False}  # fmt: skip
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(["top", "projector", "token_schedule"]))
        keys = {"top": TOP_KEYS, "projector": PROJECTOR_KEYS, "token_schedule": SCHEDULE_KEYS}
        target = config if section == "top" else config.get(section)
        if not isinstance(target, dict):
            continue
        key = draw(st.sampled_from(keys[section]))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(JSON_VALUES)
    return json.dumps(config)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tampered_checkpoints_raise_only_checkpoint_error(original, tmp_path_factory, data):
    text, tensors, raw = original
    directory = tmp_path_factory.mktemp("tampered")
    kind = data.draw(st.sampled_from(["config", "byte"]))
    if kind == "config":
        tampered = data.draw(tampered_configs(json.loads(text)))
        policy = data.draw(st.sampled_from(["recompute", "stale", "drop"]))
        write_checkpoint(directory, tampered, tensors, policy, stale_text=text)
        must_fail = policy == "stale" and tampered != text
    else:  # flip bits of one byte anywhere in the file
        offset = data.draw(st.integers(0, len(raw) - 1))
        flip = data.draw(st.integers(1, 255))
        damaged = bytearray(raw)
        damaged[offset] ^= flip
        (directory / WEIGHTS_NAME).write_bytes(bytes(damaged))
        header_end = 8 + int.from_bytes(raw[:8], "little")
        must_fail = offset >= header_end  # a data byte: only the hash can tell
    try:
        load(directory)
    except flexproj.CheckpointError:
        return
    assert not must_fail, "a tampered checkpoint loaded"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_projector_never_replaces_a_good_checkpoint(tmp_path, bad):
    import torch

    model, _ = tiny_vlm("llava")
    flexproj.patch(model, tokens=16)
    good = flexproj.save_pretrained(model, tmp_path / "ckpt")
    before = {n: (good / n).read_bytes() for n in (WEIGHTS_NAME, CONFIG_NAME)}
    weight = next(iter(flexproj.get_projector(model).parameters()))
    with torch.no_grad():
        weight.view(-1)[0] = bad
    with pytest.raises(flexproj.CheckpointError, match="NaN or infinite"):
        flexproj.save_pretrained(model, tmp_path / "ckpt")
    assert {n: (good / n).read_bytes() for n in (WEIGHTS_NAME, CONFIG_NAME)} == before
    assert sorted(p.name for p in good.iterdir()) == sorted(before)  # no temporary left
    fresh, _ = tiny_vlm("llava")
    flexproj.from_pretrained(fresh, good)  # the last good projector still loads


def test_resume_true_skips_a_checkpoint_cut_off_while_saving(tmp_path, capfd):
    """A kill during the save of checkpoint-4 leaves only its trainable.safetensors:
    ``--resume_from_checkpoint true`` resumes from checkpoint-2 (the loss sequence goes on
    exactly), and the checkpoint files get the mode a plain write gets."""
    from test_recipes import args, logged

    from flexproj.recipes.trainer import main
    from flexproj.testing.datasets import make_samples, write_llava_dataset

    data = write_llava_dataset(make_samples(8, seed=0), tmp_path / "data")
    common = ["--stage", "finetune", "--save_strategy", "steps", "--save_steps", "2"]
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main("llava", args("llava", data, out, *common, steps=4)) == 0
    finally:
        os.umask(old)
    trainable = out / "checkpoint-2" / "trainable.safetensors"
    assert stat.S_IMODE(trainable.stat().st_mode) == 0o644  # 0o666 less the umask
    full = logged(out)
    for path in (out / "checkpoint-4").iterdir():  # the kill: only the weights were written
        if path.name != "trainable.safetensors":
            path.unlink() if path.is_file() else None
    with pytest.warns(UserWarning, match="checkpoint-4 is incomplete"):
        status = main(
            "llava", args("llava", data, out, *common, "--resume_from_checkpoint", "true", steps=4)
        )
    assert status == 0
    tail = [s for s in logged(out) if s["step"] > 2][-2:]
    assert [s["loss"] for s in tail] == [s["loss"] for s in full[2:]]
    (out / "checkpoint-9").mkdir()  # a named checkpoint that is not complete: one line
    named = args("llava", data, out, *common, "--resume_from_checkpoint", str(out / "checkpoint-9"))
    assert main("llava", named) == 2
    err = capfd.readouterr().err
    assert "checkpoint-9: not a complete checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "internvl"])
def test_state_dict_keeps_the_patched_tree_and_the_stock_save_has_stock_names(family, tmp_path):
    """Decided (docs/BUDGETS.md): a patched model's ``state_dict()`` is its module tree as
    patched (``...stock.`` and ``...projector.`` keys), so it loads back into a patched model;
    what the stock class loads is ``model.save_pretrained`` (``stock_state_dict``): exactly
    the unpatched model's keys and values."""
    import torch

    model, _ = tiny_vlm(family)
    stock = {k: v.clone() for k, v in model.state_dict().items()}
    flexproj.patch(model, tokens=16)
    patched_keys = set(model.state_dict())
    assert any(".stock." in k for k in patched_keys) and not set(stock) <= patched_keys
    saved = flexproj.checkpoint.stock_state_dict(model, model.state_dict())
    assert set(saved) == set(stock)
    assert all(torch.equal(saved[k], stock[k]) for k in stock)
    model.save_pretrained(tmp_path / "model")
    reloaded = type(model).from_pretrained(tmp_path / "model")
    assert all(torch.equal(v, stock[k]) for k, v in reloaded.state_dict().items())


@pytest.mark.parametrize(
    ("section", "field", "value", "expected"),
    [
        ("projector", "eps", 0.0, "a positive finite number"),  # LayerNorm would divide by 0
        ("projector", "eps", -1e-6, "a positive finite number"),
        ("projector", "hidden_dim", 0, "a positive int"),
        (None, "default_tokens", 0, "a positive int"),
        (None, "native_tokens", 0, "a positive int or null"),
    ],
)
def test_a_field_at_its_bound_is_refused(original, tmp_path, section, field, value, expected):
    text, tensors, _ = original
    config = json.loads(text)
    (config[section] if section else config)[field] = value
    directory = write_checkpoint(tmp_path, json.dumps(config), tensors, "recompute")
    name = f"{section}.{field}" if section else field
    with pytest.raises(flexproj.CheckpointError, match=rf"{name} must be {expected}, got"):
        load(directory)


def test_an_unpatched_model_with_a_smaller_grid_loads_at_its_native_count(tmp_path):
    """A default of 64 (saved from the 8x8 grid) is more than a 4x4-grid model serves:
    loading onto it patches at its native 16 tokens, the processor counting 16."""
    model, _ = tiny_vlm("llava")
    flexproj.patch(model, tokens=64)
    directory = flexproj.save_pretrained(model, tmp_path / "ckpt")
    small, processor = tiny_vlm("llava", vision_config={"image_size": 32})  # 4 x 4 grid
    flexproj.from_pretrained(small, directory, processor)
    assert flexproj.patch_info(small).default_tokens == 16
    inputs = processor(text=["<image> what ?"], images=tiny_images([(32, 32)]), return_tensors="pt")
    assert int((inputs["input_ids"] == small.config.image_token_id).sum()) == 16
    with torch.no_grad():
        assert torch.isfinite(small(**inputs).logits).all()
