"""Fused Conv2d(kernel 4, bias=False) + BatchNorm2d + activation (the Discriminator's blocks).

Forward: implicit GEMM over NHWC (K ordered (kh, kw, cin)) with the BN statistics in its epilogue
(implicit_gemm.conv_gemm_kernel), BN finalize, then one BN-apply+activation pass (bn.py); eval
mode / no BN: BN folded into the epilogue's per-channel scale and bias. The 4x4 -> 1x1 layer with
a single output channel runs as a GEMV (implicit_gemm.gemv_kernel).
Backward: the data gradient is the phase-decomposed transposed conv (same GEMM kernel, 4 phase
GEMMs) with the BN/activation backward in its prologue; the weight gradient a split-K GEMM.
The autograd Function is block.BlockFunction; validation lives in fastdcgan.ops.
"""
from .activations import act_code
from .block import BlockSpec, run_block


def conv_bn_act(x, weight, gamma, beta, running_mean, running_var, *, stride, padding, training,
                momentum, eps, activation, negative_slope):
    spec = BlockSpec(False, stride, padding, act_code(activation), float(negative_slope),
                     gamma is not None, bool(training), float(momentum), float(eps))
    return run_block(x, weight, gamma, beta, running_mean, running_var, spec)
