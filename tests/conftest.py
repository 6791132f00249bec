"""Shared test setup. Without CUDA, fastdcgan's Triton kernels run under the Triton interpreter:
TRITON_INTERPRET must be set before triton is first imported, which conftest guarantees."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poison(monkeypatch):
    """NaN-fill fused-kernel outputs before the kernels run, so unwritten elements fail checks."""
    monkeypatch.setenv("FASTDCGAN_POISON", "1")
