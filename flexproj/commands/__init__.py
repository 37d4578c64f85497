"""Subcommands of the ``flexproj`` command line, one module each.

Each module defines ``register(subparsers)`` adding its parser with
``set_defaults(func=...)``; ``func(args) -> int`` runs it. Heavy imports happen
inside ``func`` so that ``flexproj --help`` stays fast.
"""

COMMAND_MODULES = ("info", "bench", "train", "eval", "demo", "distill", "export")
