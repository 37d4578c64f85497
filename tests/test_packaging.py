"""Packaging: every package folder ships, under flexproj.* import names."""

import importlib
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {
    "flexproj": "flexproj",
    "adapters": "flexproj.adapters",
    "recipes": "flexproj.recipes",
    "serving": "flexproj.serving",
}


def declared_packages():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"]), config["package-dir"]


def test_every_package_folder_is_declared():
    packages, package_dir = declared_packages()
    found = set()
    for top, name in MAPPING.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join([name, *rel]))
    assert found == packages
    assert package_dir == {
        "flexproj": "flexproj",
        "flexproj.adapters": "adapters",
        "flexproj.recipes": "recipes",
        "flexproj.serving": "serving",
    }


def test_adapters_and_recipes_import_under_flexproj():
    for name in ("flexproj.adapters", "flexproj.recipes", "flexproj.serving"):
        module = importlib.import_module(name)
        assert Path(module.__file__).parent == ROOT / name.split(".")[1]


def test_import_flexproj_stays_light():
    code = "import sys, flexproj; print(sorted(m for m in ('transformers', 'xformers', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_console_script_version():
    out = subprocess.run(
        [sys.executable, "-m", "flexproj.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    import flexproj

    assert out.stdout.strip() == f"flexproj {flexproj.__version__}"


def test_info_lists_the_backends_it_found(capsys):
    from flexproj.cli import main
    from flexproj.kernels.registry import backend_status

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, reason in backend_status().items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert ("unavailable" in line) == (reason is not None), line
    assert "auto on cpu/float32: eager" in out
    assert "model types: " in out and "llava" in out
