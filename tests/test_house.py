"""The house rules a newcomer relies on, read from the files: every library module is named
in docs/ARCHITECTURE.md, every document it or README.md cites exists, no library file is
over 800 lines and no library function over 120."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("flexproj", "adapters", "recipes", "serving")
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 800, 120

# Known offenders (none since the splits of issue 21 landed): an entry that is no longer over
# the limit fails, so the list cannot outlive a split and hide a new offender.
KNOWN_LONG_FILES: set[str] = set()
KNOWN_LONG_FUNCTIONS: set[str] = set()


def library_files() -> list[Path]:
    return sorted(p for root in LIBRARY for p in (ROOT / root).rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_library_module_is_named_in_the_architecture_document():
    text = ARCHITECTURE.read_text()
    missing = [rel(p) for p in library_files() if f"`{rel(p)}`" not in text]
    assert not missing, (
        f"docs/ARCHITECTURE.md names no line for {missing}: add one line per module "
        "(`path` | what it holds) to its module tables"
    )


# a markdown link to a .md file, or a document named in capitals (README.md, docs/DEMO.md);
# lower-case names (``results.md``) are files a command writes, not documents
CITATION = re.compile(r"\]\(([^)#\s]+\.md)|(?<![\w/.-])((?:[\w.-]+/)*[A-Z][A-Z0-9_]*\.md)\b")


@pytest.mark.parametrize("doc", ["README.md", "docs/ARCHITECTURE.md"])
def test_every_document_cited_exists(doc):
    text = (ROOT / doc).read_text()
    cited = {link or name for link, name in CITATION.findall(text)}
    assert cited, f"{doc} cites no document: the pattern no longer matches its links"
    here = (ROOT / doc).parent
    missing = sorted(c for c in cited if not ((here / c).exists() or (ROOT / c).exists()))
    assert not missing, f"{doc} cites {missing}, which are not in the repository"


def test_the_citation_check_sees_a_missing_document(tmp_path):
    """The check above would fail on the old 'names in DESIGN.md' line."""
    cited = CITATION.findall("| public API | `flexproj/__init__.py` (names in DESIGN.md §2) |")
    assert cited == [("", "DESIGN.md")] and not (ROOT / "DESIGN.md").exists()
    assert CITATION.findall("see [the budgets](docs/BUDGETS.md), `results.md`") == [
        ("docs/BUDGETS.md", "")
    ]


def test_no_library_file_is_over_800_lines():
    sizes = {rel(p): len(p.read_text().splitlines()) for p in library_files()}
    long = {name for name, n in sizes.items() if n > MAX_FILE_LINES}
    assert long - KNOWN_LONG_FILES == set(), {n: sizes[n] for n in long - KNOWN_LONG_FILES}
    assert KNOWN_LONG_FILES - long == set(), "no longer over the limit: remove from the list"


def long_functions(path: Path, name: str) -> dict[str, int]:
    """``{"path::name": lines}`` of the functions in ``path`` over the limit (decorators
    not counted; a nested function counts on its own and inside its parent)."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                out[f"{name}::{node.name}"] = lines
    return out


def test_no_library_function_is_over_120_lines():
    found = {k: v for p in library_files() for k, v in long_functions(p, rel(p)).items()}
    new = {k: v for k, v in found.items() if k not in KNOWN_LONG_FUNCTIONS}
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines: {new}"
    assert KNOWN_LONG_FUNCTIONS - set(found) == set(), (
        "no longer over the limit: remove from KNOWN_LONG_FUNCTIONS"
    )


def test_the_function_measure_counts_lines(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # def + 120 = 121
    file = tmp_path / "probe.py"
    file.write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert long_functions(file, "probe.py") == {"probe.py::long": 121}
