"""Serving integrations (installed as ``flexproj.serving``).

* :mod:`flexproj.serving.vllm_plugin`: the vLLM plug-in (entry point group
  ``vllm.general_plugins``): flexproj variants of vLLM's LLaVA-1.5 and Qwen2.5-VL that
  take the vision-token budget per request from ``mm_processor_kwargs={"tokens": N}``.
* :mod:`flexproj.serving.export`: ``flexproj export BASE PROJECTOR OUT``, a model
  directory that ``vllm serve OUT`` serves and transformers + ``flexproj.from_pretrained``
  load.

Nothing here imports vLLM at import time except the per-family model modules
(``vllm_llava``, ``vllm_qwen``), which vLLM imports lazily when it builds the model.
"""
