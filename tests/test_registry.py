"""The registry: every family implements the contract, registration validates, families
load lazily and fail alone."""

import inspect
import subprocess
import sys
import textwrap

import pytest

import flexproj
from flexproj.family import FamilyAdapter
from flexproj.registry import get_adapter, load_adapters, register_adapter, register_family
from flexproj.testing import FAMILIES, tiny_spec, tiny_specs, tiny_vlm


def test_supported_models_lists_every_family():
    """Every family module shipped in adapters/ is named by the registry, and loads."""
    from pathlib import Path

    folder = Path(flexproj.__file__).resolve().parent.parent / "adapters"
    shipped = {
        f"flexproj.adapters.{path.stem}"
        for path in folder.glob("*.py")
        if path.stem != "__init__" and not path.stem.endswith("_tiny")
    }
    adapters = load_adapters()
    assert {type(adapter).__module__ for adapter in adapters.values()} == shipped
    assert sorted(adapters) == flexproj.supported_models()
    assert {"llava", "qwen2_vl", "internvl"} <= set(flexproj.supported_models())


def test_every_family_declares_tiny_variants_and_a_bench_shape():
    """Each model type has a tiny variant of its own name and a bench shape, declared by
    the module its adapter names; FAMILIES is every declared variant."""
    from flexproj.testing.tiny_models import bench_shapes

    specs = tiny_specs()
    assert tuple(specs) == FAMILIES
    assert set(flexproj.supported_models()) <= set(FAMILIES)
    assert set(bench_shapes()) == set(flexproj.supported_models())
    for name, spec in specs.items():
        adapter = get_adapter(spec.model_type)
        assert spec.name == name and adapter.tiny is not None
        assert name in __import__(adapter.tiny, fromlist=["TINY"]).TINY
        assert spec.model_cls in adapter.model_classes
    assert tiny_spec("llava_siglip").model_type == "llava"
    with pytest.raises(ValueError, match="unknown tiny VLM family 'llava_nope'"):
        tiny_spec("llava_nope")


@pytest.mark.parametrize("model_type", flexproj.supported_models())
def test_registered_adapter_implements_the_interface(model_type):
    adapter = get_adapter(model_type)
    assert isinstance(adapter, FamilyAdapter)
    assert not inspect.isabstract(type(adapter))
    assert model_type in adapter.model_types
    assert adapter.model_classes and adapter.processor_classes
    assert model_type in FAMILIES
    model, processor = tiny_vlm(model_type)
    assert adapter.accepts(model)
    assert isinstance(processor, adapter.processor_classes)
    in_dim, out_dim = adapter.projector_dims(model)
    assert in_dim > 0 and out_dim == model.config.text_config.hidden_size
    native = adapter.native_tokens(model)
    assert native is None or native > 0
    assert (native is None) == adapter.caps_budget  # only per-image families have no count
    parent, attr = adapter.projector_slot(model)
    assert hasattr(parent, attr)


def test_register_adapter_validates():
    from flexproj.adapters.llava import LlavaAdapter

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
    with pytest.raises(ValueError, match="already declared"):
        register_family("llava", "somewhere.else")


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_and_patching_one_family_imports_no_other():
    out = _run(
        """
        import sys
        import flexproj
        assert "internvl" in flexproj.supported_models()
        assert not [m for m in sys.modules if m.startswith("flexproj.adapters.")], "eager"
        from flexproj.testing.tiny_models import tiny_vlm
        model, processor = tiny_vlm("internvl")
        flexproj.patch(model, processor, tokens=4)
        print(sorted(m for m in sys.modules if m.startswith("flexproj.adapters.")))
        """
    )
    # the family's adapter and its tiny-model module, no other family
    assert out.strip() == "['flexproj.adapters.internvl', 'flexproj.adapters.internvl_tiny']"


def test_a_family_with_a_missing_class_fails_alone():
    """Hide InternVLModel as an older transformers release would lack it: InternVL fails with
    an error naming the class and the version; LLaVA still patches."""
    out = _run(
        """
        from types import SimpleNamespace
        import transformers
        import transformers.models.internvl.modeling_internvl as internvl_module
        import flexproj
        from flexproj.testing.tiny_models import tiny_vlm

        model, processor = tiny_vlm("llava")
        del internvl_module.InternVLModel
        transformers.__dict__.pop("InternVLModel", None)
        internvl_like = SimpleNamespace(config=SimpleNamespace(model_type="internvl"))
        try:
            flexproj.patch(internvl_like)
        except flexproj.FamilyUnavailable as exc:
            print("ERR", exc)
        flexproj.patch(model, processor, tokens=4)
        print("llava patched", flexproj.is_patched(model))
        """
    )
    assert (
        "InternVLModel" in out and f"transformers {__import__('transformers').__version__}" in out
    )
    assert "llava patched True" in out
