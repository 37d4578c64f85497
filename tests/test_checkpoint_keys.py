"""What a save writes, read back from the files: the stock model's keys and values (the
stock class ignores unexpected keys when it reloads, so a reload cannot show extra ones),
and a content hash that covers each tensor's dtype and shape, not its bytes only."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flexproj
from flexproj.checkpoint import CONFIG_KEY, HASH_KEY, WEIGHTS_NAME, content_hash, read_checkpoint
from flexproj.testing import FAMILIES, tiny_vlm


def saved_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of the model's own safetensors file(s) in ``directory`` (not flexproj's)."""
    files = sorted(p for p in directory.glob("*.safetensors") if p.name != WEIGHTS_NAME)
    assert files, f"no model weights in {directory}"
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_save_writes_exactly_the_unpatched_models_keys_and_values(family, tmp_path):
    model, processor = tiny_vlm(family)
    model.save_pretrained(tmp_path / "stock")  # the oracle: the same weights, never patched
    flexproj.patch(model, processor, tokens=4)
    model.save_pretrained(tmp_path / "patched")

    stock, patched = saved_tensors(tmp_path / "stock"), saved_tensors(tmp_path / "patched")
    assert sorted(patched) == sorted(stock)
    for key, value in stock.items():
        assert patched[key].dtype == value.dtype and torch.equal(patched[key], value), key
    assert (tmp_path / "patched" / WEIGHTS_NAME).is_file()  # the projector, beside it


# --------------------------------------------------------------------------- content hash


@pytest.fixture(scope="module")
def half_checkpoint(tmp_path_factory):
    """A valid checkpoint of a tiny LLaVA projector saved in float16: (dir, text, tensors)."""
    model, processor = tiny_vlm("llava")
    flexproj.patch(model, processor, tokens=4)
    directory = tmp_path_factory.mktemp("half")
    flexproj.save_pretrained(model, directory)
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        text = f.metadata()[CONFIG_KEY]
        tensors = {k: f.get_tensor(k).to(torch.float16) for k in f.keys()}  # noqa: SIM118
    save_file(
        tensors,
        str(directory / WEIGHTS_NAME),
        metadata={CONFIG_KEY: text, HASH_KEY: content_hash(text, tensors)},
    )
    return directory, text, tensors


def rewrite(directory, text, tensors, stored_hash):
    """The checkpoint with ``tensors`` in place and the hash of the original kept."""
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {CONFIG_KEY: text, HASH_KEY: stored_hash}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
    return directory


def weight_name(tensors):
    return next(k for k, v in sorted(tensors.items()) if v.dim() == 2)


def test_the_float16_checkpoint_loads(half_checkpoint):
    directory, _, tensors = half_checkpoint
    model, _ = tiny_vlm("llava")
    flexproj.from_pretrained(model, directory)
    name = weight_name(tensors)
    loaded = flexproj.get_projector(model).state_dict()[name]
    assert torch.equal(loaded, tensors[name].to(loaded.dtype))


def test_a_dtype_relabel_with_the_same_bytes_is_refused(half_checkpoint, tmp_path):
    """float16 bytes read as bfloat16 are other numbers: the stored hash must not match."""
    _, text, tensors = half_checkpoint
    name = weight_name(tensors)
    relabelled = {**tensors, name: tensors[name].view(torch.bfloat16)}  # same bytes
    assert relabelled[name].untyped_storage().nbytes() == tensors[name].untyped_storage().nbytes()
    stored = content_hash(text, tensors)
    bad = rewrite(tmp_path / "relabelled", text, relabelled, stored)
    model, _ = tiny_vlm("llava")
    with pytest.raises(flexproj.CheckpointError, match="content hash"):
        flexproj.from_pretrained(model, bad)
    assert not flexproj.is_patched(model)  # nothing changed


def test_a_reshape_with_the_same_bytes_is_refused(half_checkpoint, tmp_path):
    _, text, tensors = half_checkpoint
    name = weight_name(tensors)
    rows, cols = tensors[name].shape
    reshaped = {**tensors, name: tensors[name].reshape(cols, rows).contiguous()}  # same bytes
    assert torch.equal(reshaped[name].reshape(-1), tensors[name].reshape(-1))
    bad = rewrite(tmp_path / "reshaped", text, reshaped, content_hash(text, tensors))
    with pytest.raises(flexproj.CheckpointError, match="content hash"):
        read_checkpoint(bad)
    model, _ = tiny_vlm("llava")
    with pytest.raises(flexproj.CheckpointError, match="content hash"):
        flexproj.from_pretrained(model, bad)


# --------------------------------------------------------------------------- refused contents


def test_integer_tensors_are_refused_at_load(half_checkpoint, tmp_path):
    """An int tensor would be cast into the float weights without a word."""
    _, text, tensors = half_checkpoint
    name = weight_name(tensors)
    ints = {**tensors, name: tensors[name].round().to(torch.int32)}
    bad = rewrite(tmp_path / "ints", text, ints, content_hash(text, ints))  # a valid hash
    model, _ = tiny_vlm("llava")
    with pytest.raises(flexproj.CheckpointError, match=rf"{name}.*dtype torch.int32, not float"):
        flexproj.from_pretrained(model, bad)
    assert not flexproj.is_patched(model)


@pytest.mark.parametrize("edit", ["shape", "missing", "extra"])
def test_a_state_dict_that_does_not_match_the_projector_is_refused(tmp_path, edit):
    model, processor = tiny_vlm("llava")
    flexproj.patch(model, processor, tokens=4)
    state = {k: v.clone() for k, v in flexproj.get_projector(model).state_dict().items()}
    name = weight_name(state)
    if edit == "shape":
        state[name] = state[name][:-1]
    elif edit == "missing":
        del state[name]
    else:
        state["extra.weight"] = torch.zeros(2)
    with pytest.raises(flexproj.CheckpointError, match="state_dict does not match the projector"):
        flexproj.save_pretrained(model, tmp_path / "ckpt", state_dict=state)
    assert not (tmp_path / "ckpt" / WEIGHTS_NAME).exists()
