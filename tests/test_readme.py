"""The README's tiny-model example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_patch_example_runs(capsys):
    block = next(b for b in python_blocks() if 'tiny_vlm("llava")' in b)
    exec(compile(block, str(README), "exec"), {})
    assert capsys.readouterr().out.strip() == "4"


def test_projector_example_gives_the_shapes_it_promises():
    """Each expression line of the block evaluates to what its ``#`` comment says."""
    block = next(b for b in python_blocks() if "flexproj.FlexProjector(in_dim=1024" in b)
    scope: dict = {}
    checked = []
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        code, comment = code.strip(), comment.strip()
        if not code:
            continue
        if re.fullmatch(r"\(\d+(, \d+)*\)(: .*)?", comment):  # an expression and its value
            promised = tuple(int(v) for v in comment.split(")")[0].strip("(").split(","))
            value = eval(compile(code, str(README), "eval"), scope)
            if isinstance(value, torch.Tensor):  # a tensor's comment gives its shape
                value = value.shape
            assert tuple(value) == promised, (code, tuple(value), promised)
            checked.append(code)
        else:
            exec(compile(code, str(README), "exec"), scope)
    assert len(checked) == 4  # three shapes and the target grid
    proj = scope["proj"]
    assert proj.hidden_dim == 3 * 1024  # "hidden defaults to 3*in_dim"
