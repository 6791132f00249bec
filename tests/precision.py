"""Error measures and small helpers shared by the kernel tests.

rel_err: relative Frobenius error against a float64 reference (NaN never passes).
allowed: the tolerance for one quantity: a fixed floor, or twice the error that eager PyTorch
makes at the same precision (cuDNN with TF32, or bf16 autocast) on the same inputs, whichever is
larger. Gradients through ReLU/LeakyReLU need the second: a reduced-precision forward flips the
sign of pre-activations near zero, which changes act' there, and the relative error of such a
gradient grows like the square root of the flipped fraction (~1e-2 with TF32), for cuDNN as for us.
"""
import contextlib
import copy

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# tiny-shape tests run under the interpreter only: on a GPU every new shape class is a kernel
# compile of seconds, and the GPU runs the full-size cases instead
interpreter_only = pytest.mark.skipif(CUDA, reason="tiny-shape interpreter test; the GPU runs full sizes")


def vec(c, lo=-0.5, hi=0.5):
    """A random per-channel vector (BN scale, shift, ...) of c values in [lo, hi)."""
    return torch.empty(c, device=DEV).uniform_(lo, hi)


def nhwc(t):
    return t.permute(0, 2, 3, 1)


def nchw(t):
    return t.permute(0, 3, 1, 2)


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(out).any(), "NaN in the result"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def allowed(floor, eager, ref):
    return max(floor, 2 * rel_err(eager, ref))


def eager_precision(dtype, device):
    """The eager baseline's context: bf16 autocast for bf16, TF32 cuDNN/cuBLAS for fp32 on CUDA."""
    if dtype == torch.bfloat16:
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


ACTS = {"relu": lambda s: nn.ReLU(), "leaky_relu": lambda s: nn.LeakyReLU(s), "tanh": lambda s: nn.Tanh(),
        "sigmoid": lambda s: nn.Sigmoid(), "none": lambda s: nn.Identity()}


def make_block(conv_cls, b, cin, cout, hw, stride, pad, bn, act, slope=0.2, dtype=torch.float32,
               device="cpu"):
    """Fresh random float64 reference nn.Sequential(conv_cls, [BatchNorm2d,] activation) and an
    input; input and conv weight are rounded to `dtype` so the op and the reference see the same
    values."""
    conv = conv_cls(cin, cout, 4, stride, pad, bias=False).double()
    nn.init.normal_(conv.weight, 0.0, 0.1)
    mods = [conv]
    if bn:
        norm = nn.BatchNorm2d(cout).double()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.2)
            norm.running_mean.normal_(0.0, 0.3)
            norm.running_var.uniform_(0.5, 2.0)
        mods.append(norm)
    mods.append(ACTS[act](slope))
    ref = nn.Sequential(*mods).to(device)
    x = torch.randn(b, cin, hw, hw, device=device, dtype=torch.float64).to(dtype).double()
    with torch.no_grad():
        conv.weight.copy_(conv.weight.to(dtype).double())
    return ref, x


def check_block(op, ref, x, dtype, training, tol, **op_kwargs):
    """A fused block op (conv or convT + optional BN + activation) against `ref`, the float64
    nn.Sequential(conv, [BatchNorm2d,] activation) with the same weights: output, running stats
    and the gradients of x, weight, gamma and beta, each within allowed(tol, eager, reference)."""
    ref.train(training)
    eager = copy.deepcopy(ref).float()   # before ref's forward moves the running stats
    conv, norm = ref[0], ref[1] if isinstance(ref[1], nn.BatchNorm2d) else None
    w = conv.weight.detach().to(dtype).clone().requires_grad_()
    if norm is not None:
        g = norm.weight.detach().float().clone().requires_grad_()
        b = norm.bias.detach().float().clone().requires_grad_()
        rm, rv = norm.running_mean.float().clone(), norm.running_var.float().clone()
    else:
        g = b = rm = rv = None
    xo = x.to(dtype).clone().requires_grad_()
    out = op(xo, w, g, b, rm, rv, training=training, **op_kwargs)
    xr, xe = x.clone().requires_grad_(), x.float().clone().requires_grad_()
    expect = ref(xr)
    with eager_precision(dtype, x.device):
        eager_out = eager(xe)
    assert out.shape == expect.shape and out.dtype == dtype
    assert rel_err(out, expect) < allowed(tol, eager_out, expect)
    if norm is not None:
        for name in ("running_mean", "running_var"):
            ours, want, base = rm if name == "running_mean" else rv, getattr(norm, name), getattr(eager[1], name)
            assert rel_err(ours, want) < allowed(tol, base, want), name
    grad = torch.randn_like(expect)
    params = [xo, w] + ([g, b] if norm is not None else [])
    rparams = [xr, conv.weight] + ([norm.weight, norm.bias] if norm is not None else [])
    eparams = [xe, eager[0].weight] + ([eager[1].weight, eager[1].bias] if norm is not None else [])
    got = torch.autograd.grad(out, params, grad.to(dtype))
    want = torch.autograd.grad(expect, rparams, grad)
    base = torch.autograd.grad(eager_out, eparams, grad.to(eager_out.dtype))
    for name, a, e, be in zip(["x", "weight", "gamma", "beta"], got, want, base):
        assert a.dtype == (dtype if name in ("x", "weight") else torch.float32), name
        assert rel_err(a, e) < allowed(tol, be, e), name


# Full-width GPU tests. Each distinct kernel specialization is a compile of a few seconds on the
# GPU host (~130 for the whole GPU run), so the matrix is: every layer trained in tf32 and bf16
# (the kernels benches/layer_table.py also uses; batch 32 keeps the integer specializations of
# B = 128/512), one BN layer in eval mode and one in exact fp32 (ieee); the interpreter covers
# the rest. Floors of `allowed`: TF32 truncates operands (~1e-3 each), bf16 keeps 8 bits.
GPU_TOL = {"tf32": 1e-2, "ieee": 5e-5, "bf16": 3e-2}


def gpu_cases(layers):
    """(layer, mode, training) cases for layer tuples (cin, cout, hw, stride, padding, bn, act)."""
    cases = [(layer, mode, True) for layer in layers for mode in ("tf32", "bf16")]
    return cases + [(layers[2], "tf32", False), (layers[2], "ieee", True)]


def gpu_case_id(v):
    if isinstance(v, tuple):
        return f"{v[0]}to{v[1]}_{v[2]}x{v[2]}"
    return v if isinstance(v, str) else ("train" if v else "eval")


def gpu_mode(mode, monkeypatch):
    """The op dtype for a GPU test mode; sets the fp32 dot precision (tf32 or ieee)."""
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee" if mode == "ieee" else "tf32")
    return torch.bfloat16 if mode == "bf16" else torch.float32


# how the fused network's GEMMs get their operands: (FASTDCGAN_MATERIALIZE_ACT,
# FASTDCGAN_MATERIALIZE_DY); both materialized is the default
FEEDS = {"prologues": ("0", "0"), "dy-materialized": ("0", "1"), "act-materialized": ("1", "0"),
         "both-materialized": ("1", "1")}


def use_feed(feed, monkeypatch):
    """Runs the fused network's GEMMs on the operand feed `feed` (a FEEDS key)."""
    materialize_act, materialize_dy = FEEDS[feed]
    monkeypatch.setenv("FASTDCGAN_MATERIALIZE_ACT", materialize_act)
    monkeypatch.setenv("FASTDCGAN_MATERIALIZE_DY", materialize_dy)
