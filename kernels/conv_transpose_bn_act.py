"""Fused ConvTranspose2d(kernel 4, bias=False) + BatchNorm2d + activation (the Generator's blocks).

Forward: stride 2 / padding 1 runs as 4 phase GEMMs (output pixel parity (oh%2, ow%2); each a
stride-1 conv with a 2x2 sub-kernel over the low-resolution input: no zero insertion, no wasted
MACs); the first layer (1x1 z -> 4x4) as 16 GEMMs [B, nz] @ [nz, Cout], one per output pixel.
BN statistics come from the GEMM epilogue, then finalize and one BN-apply+activation pass.
Backward: the data gradient is a strided Conv2d (the same implicit-GEMM kernel) with the
BN/activation backward applied in its prologue; the weight gradient a split-K GEMM per phase.
The autograd Function is block.BlockFunction; validation lives in fastdcgan.ops.
"""
from .activations import act_code
from .block import BlockSpec, run_block


def conv_transpose_bn_act(x, weight, gamma, beta, running_mean, running_var, *, stride, padding,
                          training, momentum, eps, activation, negative_slope):
    spec = BlockSpec(True, stride, padding, act_code(activation), float(negative_slope),
                     gamma is not None, bool(training), float(momentum), float(eps))
    return run_block(x, weight, gamma, beta, running_mean, running_var, spec)
