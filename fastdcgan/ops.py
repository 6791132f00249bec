"""Fused DCGAN ops (autograd-aware), backed by the Triton kernels in fastdcgan.kernels.

conv_transpose_bn_act / conv_bn_act: F.conv_transpose2d / F.conv2d (kernel 4, bias=False)
followed by F.batch_norm (skipped when gamma is None) and an activation, in one fused op with
gradients for x, weight, gamma and beta. fused_network: a chain of such blocks run as one
autograd Function whose GEMMs read the previous block's raw output through a BN+activation
prologue (what the models' triton backend uses).

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is imported). fp32 GEMMs use TF32 unless FASTDCGAN_FP32_PRECISION=ieee. Inside
CUDA autocast (bf16/fp16) the ops compute in the autocast dtype.
Results are returned as NCHW-shaped tensors in channels_last memory format.
"""
import os

import torch

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED = ((2, 1), (1, 0))   # (stride, padding) pairs of the DCGAN family
_INT32_MAX = 2**31 - 1


def _as_int(v, name):
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{name} must be an int or a pair of equal ints, got {v!r}")
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}")
    return v


def _check_device(device):
    if device.type == "cuda":
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return
    raise RuntimeError(
        f"fastdcgan's fused ops run Triton kernels and need CUDA tensors (got a {device.type} tensor); "
        "on CPU set TRITON_INTERPRET=1 before importing triton to use the (slow) interpreter, or use "
        "the models' backend='reference'")


def _validate_block(op, shape, dtype, device, weight, gamma, beta, running_mean, running_var, *,
                    transposed, stride, padding, training, momentum, eps):
    """Checks one block given its input's shape/dtype/device; returns the output shape."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{op}: weight must be a tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-D, got shape {tuple(weight.shape)}")
    if tuple(weight.shape[2:]) != (4, 4):
        raise ValueError(f"{op}: only kernel size 4 is supported, got weight {tuple(weight.shape)}")
    if weight.dtype not in (dtype, torch.float32):
        raise ValueError(f"{op}: weight dtype {weight.dtype} must be float32 or the input's {dtype}")
    if weight.device != device:
        raise ValueError(f"{op}: weight is on {weight.device} but the input is on {device}")
    cin, cout = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    layout = "(Cin, Cout, 4, 4)" if transposed else "(Cout, Cin, 4, 4)"
    if shape[1] != cin:
        raise ValueError(f"{op}: input has {shape[1]} channels but weight {tuple(weight.shape)} "
                         f"{layout} expects {cin}")
    if (stride, padding) not in _SUPPORTED:
        raise ValueError(f"{op}: unsupported stride={stride}, padding={padding}; supported "
                         f"(stride, padding): {_SUPPORTED}")
    if transposed:
        oh, ow = ((s - 1) * stride - 2 * padding + 4 for s in shape[2:])
    else:
        oh, ow = ((s + 2 * padding - 4) // stride + 1 for s in shape[2:])
    if oh < 1 or ow < 1:
        raise ValueError(f"{op}: input spatial size {tuple(shape[2:])} is too small for kernel 4, "
                         f"stride {stride}, padding {padding}")
    if max(shape[0] * shape[1] * shape[2] * shape[3], shape[0] * cout * oh * ow) > _INT32_MAX:
        raise ValueError(f"{op}: tensors with more than 2^31-1 elements are not supported")
    bn_tensors = dict(beta=beta, running_mean=running_mean, running_var=running_var)
    if gamma is None:
        given = [k for k, v in bn_tensors.items() if v is not None]
        if given:
            raise ValueError(f"{op}: gamma=None means no BatchNorm, but {', '.join(given)} given "
                             "(pass gamma=torch.ones(C) for a BatchNorm without affine weight)")
        return (shape[0], cout, oh, ow)
    bn_tensors["gamma"] = gamma
    for k, v in bn_tensors.items():
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise ValueError(f"{op}: {k} must be a floating-point tensor")
        if v.device != device:
            raise ValueError(f"{op}: {k} is on {v.device} but the input is on {device}")
        if v.dim() != 1 or v.numel() != cout:
            raise ValueError(f"{op}: {k} must have shape ({cout},), got {tuple(v.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: eval-mode BatchNorm (training=False) needs running_mean/running_var")
    if training and shape[0] * oh * ow <= 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got "
                         f"output size {(shape[0], cout, oh, ow)}")
    if not isinstance(momentum, (int, float)) or not isinstance(eps, (int, float)):
        raise ValueError(f"{op}: momentum and eps must be numbers")
    if eps <= 0:
        raise ValueError(f"{op}: eps must be positive, got {eps}")
    return (shape[0], cout, oh, ow)


def _validate_input(op, x):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{op}: x dtype must be one of {_DTYPES}, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{op}: x is empty, shape {tuple(x.shape)}")
    _check_device(x.device)


def _autocast(x):
    """Under CUDA autocast to bf16/fp16 the fused ops run in that dtype, like autocast's convs:
    fp32 activations are cast on the way in; weights are cast as the kernels pack them, BN
    parameters and statistics stay fp32, gradients come back in the parameters' dtype."""
    if x.is_cuda and x.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        if dtype in (torch.bfloat16, torch.float16):
            return x.to(dtype)
    return x


def _block(op, transposed, x, weight, gamma, beta, running_mean, running_var, stride, padding,
           training, momentum, eps, activation, negative_slope):
    from fastdcgan.kernels.activations import act_code

    _validate_input(op, x)
    x = _autocast(x)
    stride, padding = _as_int(stride, "stride"), _as_int(padding, "padding")
    act_code(activation)
    _validate_block(op, tuple(x.shape), x.dtype, x.device, weight, gamma, beta, running_mean,
                    running_var, transposed=transposed, stride=stride, padding=padding,
                    training=training, momentum=momentum, eps=eps)
    if gamma is not None and beta is None:
        beta = torch.zeros_like(gamma)
    return x, dict(stride=stride, padding=padding, training=training, momentum=momentum, eps=eps,
                   activation=activation, negative_slope=negative_slope), beta


def conv_transpose_bn_act(x, weight, gamma, beta, running_mean, running_var, *, stride=2, padding=1,
                          training=True, momentum=0.1, eps=1e-5, activation="relu", negative_slope=0.2):
    """act(batch_norm(conv_transpose2d(x, weight, stride, padding))); weight (Cin, Cout, 4, 4).
    gamma=None: no BatchNorm. training: batch statistics + in-place running-stat update."""
    x, kw, beta = _block("conv_transpose_bn_act", True, x, weight, gamma, beta, running_mean,
                         running_var, stride, padding, training, momentum, eps, activation,
                         negative_slope)
    from fastdcgan.kernels.conv_transpose_bn_act import conv_transpose_bn_act as fused

    return fused(x, weight, gamma, beta, running_mean, running_var, **kw)


def conv_bn_act(x, weight, gamma, beta, running_mean, running_var, *, stride=2, padding=1,
                training=True, momentum=0.1, eps=1e-5, activation="leaky_relu", negative_slope=0.2):
    """act(batch_norm(conv2d(x, weight, stride, padding))); weight (Cout, Cin, 4, 4).
    gamma=None: no BatchNorm. training: batch statistics + in-place running-stat update."""
    x, kw, beta = _block("conv_bn_act", False, x, weight, gamma, beta, running_mean, running_var,
                         stride, padding, training, momentum, eps, activation, negative_slope)
    from fastdcgan.kernels.conv_bn_act import conv_bn_act as fused

    return fused(x, weight, gamma, beta, running_mean, running_var, **kw)


def fused_network(x, blocks, groups=1):
    """Runs a chain of blocks as one fused autograd Function.

    blocks: sequence of dicts with keys weight, transposed, stride, padding, activation and
    optionally negative_slope (0.2), gamma, beta, running_mean, running_var (None: no BN),
    training (True), momentum (0.1), eps (1e-5), num_batches_tracked (an int64 one-element
    tensor that a training-mode BN adds 1 to, as nn.BatchNorm2d does). Same semantics as
    chaining the per-block ops.

    groups: x is that many equal batches one after the other, and the result is that of running
    the chain on each in turn (training BatchNorm: each batch's own statistics; running stats
    and num_batches_tracked updated batch by batch), in one pass (groups times the rows per GEMM).
    A group's GEMM rows per phase must be a multiple of 16 (for the DCGAN discriminator on
    64x64 images: 16 images per group).
    """
    from fastdcgan.kernels.activations import act_code
    from fastdcgan.kernels.block import BlockSpec
    from fastdcgan.kernels.network import grouping_error, run_network

    _validate_input("fused_network", x)
    x = _autocast(x)
    if not blocks:
        raise ValueError("fused_network: no blocks")
    shape, specs, tensors = tuple(x.shape), [], []
    for i, b in enumerate(blocks):
        op = f"fused_network block {i}"
        stride, padding = _as_int(b["stride"], "stride"), _as_int(b["padding"], "padding")
        gamma, beta = b.get("gamma"), b.get("beta")
        rm, rv = b.get("running_mean"), b.get("running_var")
        training = bool(b.get("training", True))
        momentum, eps = b.get("momentum", 0.1), b.get("eps", 1e-5)
        slope = b.get("negative_slope", 0.2)
        shape = _validate_block(op, shape, x.dtype, x.device, b["weight"], gamma, beta, rm, rv,
                                transposed=bool(b["transposed"]), stride=stride, padding=padding,
                                training=training, momentum=momentum, eps=eps)
        if gamma is not None and beta is None:
            beta = torch.zeros_like(gamma)
        nbt = b.get("num_batches_tracked")
        if nbt is not None and not (isinstance(nbt, torch.Tensor) and nbt.dtype == torch.int64
                                    and nbt.numel() == 1 and nbt.device == x.device):
            raise ValueError(f"{op}: num_batches_tracked must be a one-element int64 tensor on "
                             f"{x.device}")
        if nbt is not None and not (gamma is not None and training):
            raise ValueError(f"{op}: num_batches_tracked is counted by a training-mode BatchNorm only")
        specs.append(BlockSpec(bool(b["transposed"]), stride, padding, act_code(b["activation"]),
                               float(slope), gamma is not None, training, float(momentum), float(eps)))
        tensors += [b["weight"], gamma, beta, rm, rv, nbt]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"fused_network: groups must be a positive int, got {groups!r}")
    if groups > 1:
        convs = tuple((s.transposed, s.stride, s.padding) for s in specs)
        err = grouping_error(tuple(x.shape), convs, groups)
        if err:
            raise ValueError(f"fused_network: cannot run {groups} batch groups in one pass: {err}")
    return run_network(x, specs, tensors, groups)
