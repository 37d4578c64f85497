"""Every registered adapter implements the interface; registration validates."""

import inspect

import pytest

import flexproj
from flexproj.adapters import FamilyAdapter, register_adapter, registered_adapters
from flexproj.adapters.llava import LlavaAdapter
from flexproj.testing import FAMILIES, tiny_vlm

TINY_FAMILY_FOR = {
    "llava": "llava",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "internvl": "internvl",
}


def test_supported_models_reads_the_registry():
    assert flexproj.supported_models() == sorted(registered_adapters())
    assert {"llava", "llava_next", "llava_onevision"} <= set(flexproj.supported_models())


@pytest.mark.parametrize("model_type", sorted(registered_adapters()))
def test_registered_adapter_implements_the_interface(model_type):
    adapter = registered_adapters()[model_type]
    assert isinstance(adapter, FamilyAdapter)
    assert not inspect.isabstract(type(adapter))
    assert model_type in adapter.model_types
    assert adapter.model_classes and adapter.processor_classes
    family = TINY_FAMILY_FOR[model_type]
    assert family in FAMILIES
    model, processor = tiny_vlm(family)
    assert adapter.accepts(model)
    assert isinstance(processor, adapter.processor_classes)
    in_dim, out_dim = adapter.projector_dims(model)
    assert in_dim > 0 and out_dim == model.config.text_config.hidden_size
    assert adapter.native_tokens(model) > 0
    parent, attr = adapter.projector_slot(model)
    assert hasattr(parent, attr)


def test_register_adapter_validates():
    class NoTypes(LlavaAdapter):
        model_types = ()

    class Clash(LlavaAdapter):
        pass

    with pytest.raises(TypeError, match="FamilyAdapter instance"):
        register_adapter(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_types must be non-empty"):
        register_adapter(NoTypes())
    with pytest.raises(ValueError, match="'llava' is already handled by LlavaAdapter"):
        register_adapter(Clash())
