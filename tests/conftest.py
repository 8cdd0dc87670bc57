"""Test-session setup.

Without CUDA, the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, so it is set here, before anything imports triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
