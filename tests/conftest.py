"""Shared test setup. Without CUDA, fastdcgan's Triton kernels run under the Triton interpreter:
TRITON_INTERPRET must be set before triton is first imported, which conftest guarantees."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
