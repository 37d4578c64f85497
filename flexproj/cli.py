"""The ``flexproj`` command line: ``flexproj COMMAND ...`` (see ``flexproj --help``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from flexproj._version import __version__
from flexproj.commands import COMMAND_MODULES
from flexproj.errors import FlexprojError

#: what a command reports as one line on stderr with exit status 2: flexproj's own errors,
#: files that are missing, unreadable or unwritable, bad values, a missing optional package
USER_ERRORS = (FlexprojError, OSError, ValueError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexproj", description="Variable vision-token projectors for Hugging Face VLMs."
    )
    parser.add_argument("--version", action="version", version=f"flexproj {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"flexproj.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return run_command(func, args)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """The one wrapper every command runs in: a :data:`USER_ERRORS` error is one line on
    stderr and exit status 2, never a traceback."""
    try:
        return func(args)
    except USER_ERRORS as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
