"""Fused Triton kernels of fastdcgan (installed as fastdcgan.kernels)."""
import os

from .interpreter import fix_bf16

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    fix_bf16()   # before any kernel runs: bf16 under the interpreter as on a GPU
