"""Fused Triton kernels of fastdcgan (installed as fastdcgan.kernels)."""
