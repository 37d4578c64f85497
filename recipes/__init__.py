"""Training recipes (installed as ``flexproj.recipes``): ``python -m flexproj.recipes.<family>``
or ``flexproj train <family>`` for ``llava``, ``qwen_vl`` and ``internvl``; see docs/TRAINING.md."""
