"""Integrations with evaluation tools (top layer).

* :mod:`flexproj.integrations.lmms_eval`: the ``flexproj`` model of lmms-eval
  (``pip install 'flexproj[lmms-eval]'``), registered through lmms-eval's entry point
  group ``lmms_eval.models``; local tasks over LLaVA-format files; budget sweeps.

Nothing here is imported by ``import flexproj``.
"""
