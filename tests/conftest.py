"""Shared test set-up.

Triton kernels run on CPU tensors only under its interpreter, and ``@triton.jit``
reads the switch when a kernel module is imported, so it is set before any test
imports one (on a machine without CUDA only: with a GPU the real kernels run).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
