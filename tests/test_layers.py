"""The dependency rule, read from the source (``ast``), at every depth.

Layers, lowest first (docs/ARCHITECTURE.md)::

    core      flexproj/ (its testing/ too), minus what is listed below
    adapters  adapters/            (installed as flexproj.adapters)
    recipes   recipes/             (installed as flexproj.recipes)
    top       flexproj/demo/, flexproj/bench/, flexproj/integrations/, serving/
    cli       flexproj/cli.py, flexproj/commands/

A module may import its own layer and the layers below it, never one above: core never
imports adapters or recipes (not even inside a function: it reaches a family module only
through :mod:`flexproj.registry`), adapters never import recipes, the top layer or the
CLI, and nothing but the CLI imports the CLI. Imports are ``import``, ``from ... import``
(relative ones resolved) and ``importlib.import_module`` / ``__import__`` with a literal
string.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANK = {"core": 0, "adapters": 1, "recipes": 2, "top": 3, "cli": 4}
#: source folder -> the package it is installed as (pyproject's package-dir)
PACKAGES = {
    "flexproj": "flexproj",
    "adapters": "flexproj.adapters",
    "recipes": "flexproj.recipes",
    "serving": "serving",
}


def module_name(path: Path) -> str:
    """The dotted name ``path`` (relative to the repository root) is imported as."""
    parts = list(path.with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str | None:
    """The layer of a flexproj module name; ``None`` for anything else (third party)."""

    def under(prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    if under("flexproj.cli") or under("flexproj.commands"):
        return "cli"
    tops = (
        "flexproj.demo",
        "flexproj.bench",
        "flexproj.integrations",
        "flexproj.serving",
        "serving",
    )
    if any(under(p) for p in tops):
        return "top"
    if under("flexproj.adapters"):
        return "adapters"
    if under("flexproj.recipes"):
        return "recipes"
    if under("flexproj"):
        return "core"
    return None


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``source`` (the text of ``module``); a
    ``from pkg import name`` gives ``pkg`` and ``pkg.name`` (it may import a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.append((node.lineno, origin))
            found += [(node.lineno, f"{origin}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                found.append((node.lineno, first.value))
    return found


def violations(source: str, path: str) -> list[str]:
    """The imports in ``source`` (the file at ``path``) that break the rule."""
    relative = Path(path)
    module = module_name(relative)
    own = layer(module)
    assert own is not None, path
    out: dict[int, str] = {}  # one report per import statement
    for line, target in imported_modules(source, module, relative.name == "__init__.py"):
        other = layer(target)
        if other is not None and RANK[other] > RANK[own] and line not in out:
            out[line] = f"{path}:{line}: {own} module {module} imports {other} module {target}"
    return [out[line] for line in sorted(out)]


def source_files() -> list[Path]:
    files = []
    for folder in PACKAGES:
        if (ROOT / folder).is_dir():
            files += sorted((ROOT / folder).rglob("*.py"))
    return [f.relative_to(ROOT) for f in files]


def test_every_layer_imports_only_itself_and_the_layers_below():
    files = source_files()
    assert {f.parts[0] for f in files} >= {"flexproj", "adapters", "recipes"}
    found = [v for f in files for v in violations((ROOT / f).read_text(encoding="utf-8"), str(f))]
    assert found == []


def test_files_map_to_the_documented_layers():
    layers = {str(f): layer(module_name(f)) for f in source_files()}
    assert layers["flexproj/registry.py"] == "core"
    assert layers["flexproj/testing/tiny_models.py"] == "core"
    assert layers["adapters/llava.py"] == "adapters"
    assert layers["recipes/trainer.py"] == "recipes"
    assert layers["flexproj/demo/convert.py"] == "top"
    assert layers["flexproj/bench/e2e.py"] == "top"
    assert layers["flexproj/cli.py"] == "cli"
    assert layers["flexproj/commands/bench.py"] == "cli"
    assert None not in layers.values()


# --------------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    ("path", "source", "target"),
    [
        # core, inside a function
        ("flexproj/pooling.py", "def f():\n    import flexproj.adapters.llava\n", "adapters"),
        # core, relative import from a subpackage
        ("flexproj/testing/x.py", "from ..recipes import trainer\n", "recipes"),
        # core, `from flexproj import adapters` imports the package
        ("flexproj/state.py", "from flexproj import adapters\n", "adapters"),
        # core, a literal importlib call
        (
            "flexproj/registry.py",
            "import importlib\nimportlib.import_module('flexproj.adapters.qwen_vl')\n",
            "adapters",
        ),
        # adapters importing a recipe, under TYPE_CHECKING
        (
            "adapters/llava.py",
            "if TYPE_CHECKING:\n    from flexproj.recipes.family import FamilyRecipe\n",
            "recipes",
        ),
        # adapters importing the top layer
        ("adapters/qwen_vl.py", "from flexproj.bench import e2e\n", "top"),
        # the top layer importing the CLI
        ("flexproj/demo/convert.py", "from flexproj.cli import main\n", "cli"),
        # recipes importing the CLI
        ("recipes/trainer.py", "from flexproj.commands import train\n", "cli"),
    ],
)
def test_the_checker_finds_a_violation(path, source, target):
    found = violations(source, path)
    assert len(found) == 1
    assert found[0].startswith(f"{path}:") and f"imports {target} module" in found[0]


def test_the_checker_allows_imports_downwards_and_within_a_layer():
    sources = {
        "flexproj/testing/x.py": "from .tiny_models import tiny_vlm\nfrom flexproj import registry\n",
        "adapters/llava.py": "from flexproj.family import FamilyAdapter\nfrom . import qwen_vl\n",
        "recipes/llava.py": "from flexproj.adapters import llava\nimport flexproj\n",
        "flexproj/bench/train.py": "from flexproj.recipes.trainer import set_trainable\n",
        "flexproj/commands/bench.py": "import importlib\nimportlib.import_module('flexproj.cli')\n",
        "flexproj/registry.py": "import importlib\nimportlib.import_module(name)\nimport torch\n",
    }
    assert {path: violations(source, path) for path, source in sources.items()} == {
        path: [] for path in sources
    }


def raised_untyped(source: str) -> list[int]:
    """Lines of ``raise SystemExit`` / ``raise RuntimeError`` (exception or call) in ``source``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in ("SystemExit", "RuntimeError"):
                lines.append(node.lineno)
    return sorted(lines)


def test_library_code_raises_typed_flexproj_errors():
    """Below the CLI (whose commands return exit statuses), errors are flexproj's own."""
    found = {
        str(f): lines
        for f in source_files()
        if layer(module_name(f)) != "cli"
        and (lines := raised_untyped((ROOT / f).read_text(encoding="utf-8")))
    }
    assert found == {}
    assert raised_untyped("def f():\n    raise SystemExit(2)\nraise RuntimeError\n") == [2, 3]
    assert raised_untyped("raise PatchError('x')\nraise\n") == []


# --------------------------------------------------------------------------- no import cycle


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (never imported at run time)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports at run time, at any depth of the
    file (module level and inside functions); packages' ``__init__`` re-exports left out."""
    files = {module_name(f): f for f in source_files()}
    packages = {m for m, f in files.items() if f.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        source = (ROOT / path).read_text(encoding="utf-8")
        skip = _type_checking_lines(ast.parse(source))
        targets = imported_modules(source, module, path.name == "__init__.py")
        graph[module] = {
            t for line, t in targets
            if line not in skip and t in files and t not in packages and t != module
        }  # fmt: skip
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_library_modules():
    graph = import_graph()
    assert "flexproj.checkpoint" in graph and "flexproj.family" in graph
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_function_level_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
