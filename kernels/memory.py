"""Output allocation for the fused kernels.

FASTDCGAN_POISON=1 (set by the tests) fills every kernel output and partial buffer with NaN
before the kernel runs, so an element a kernel fails to write shows up as NaN instead of stale
memory that happens to look right.
"""
import os

import torch


def new_empty(shape, device, dtype=torch.float32):
    if os.environ.get("FASTDCGAN_POISON", "0") == "1":
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)
