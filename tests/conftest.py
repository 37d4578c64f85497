"""Shared test set-up.

Triton kernels run on CPU tensors only under its interpreter, and ``@triton.jit``
reads the switch when a kernel module is imported, so it is set before any test
imports one (on a machine without CUDA only: with a GPU the real kernels run).

The tiny models gain nothing from intra-op threads, and on a busy machine two OpenMP
threads can stall each other for whole time slices (measured here: 36 s instead of 1 s
for one eval test), so the suite runs torch on one thread.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
