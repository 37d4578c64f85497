"""The README's tiny-model example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_patch_example_runs(capsys):
    block = next(b for b in python_blocks() if 'tiny_vlm("llava")' in b)
    exec(compile(block, str(README), "exec"), {})
    assert capsys.readouterr().out.strip() == "4"


def test_projector_example_runs():
    block = next(b for b in python_blocks() if "flexproj.FlexProjector(in_dim=1024" in b)
    exec(compile(block, str(README), "exec"), {})
