"""Per-family adapters (installed as ``flexproj.adapters``), one module per family.

Nothing here is imported eagerly: :mod:`flexproj.registry` imports a family's module the
first time a model of that family is patched.
"""
