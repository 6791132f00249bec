"""One DCGAN block, conv (or transposed conv) + optional BatchNorm + activation, forward and
backward on NHWC tensors. Used by the per-op autograd Functions (conv_bn_act.py,
conv_transpose_bn_act.py) and by the chained whole-network Function (network.py).

Forward (training BN): conv GEMM storing the raw output y + per-tile BN partials -> finalize
(mean, rstd, scale, shift, running stats). The normalized activation act(y*scale + shift) is
either applied by the consumer GEMM's prologue (chained network: never materialized) or by one
elementwise pass (per-op API, which must return it). Eval BN / no BN: the transform is known
before the GEMM, so the epilogue applies it (BN folded into a per-channel scale and bias).

Backward: (BN) per-channel reductions sum(dz), sum(dz*xhat) -> coefficients A, B, C; the weight
gradient (split-K GEMM) and the data gradient (the "other" conv direction) both load
dy = A*dz + B*y + C through their prologue. Saved: the block input (or the producer's raw y),
this block's raw y, and per-channel mean/rstd/scale/shift only.

By default the backward writes dy out once per block (one elementwise pass) and both GEMMs read
it raw; FASTDCGAN_MATERIALIZE_DY=0 has each of them apply the BN/activation backward to two
tensors (g, y) in its prologue instead -- the weight gradient once per weight tile, the data
gradient once per tap and phase. The default is the one with the leaner GEMM main loops
(benches/compile_check.py --loops, benches/gemm_model.py); benches/step_table.py --feeds times
both ways on a GPU.

Weights are kernel-layout tensors (kernels/weights.py) in the compute dtype; weight gradients are
fp32 kernel-layout tensors, accumulated into a given buffer (a parameter's .grad) or new.

With FASTDCGAN_WGRAD_STREAM=1 a chain's backward (kernels/network.py) runs the weight gradients
that go into a given buffer on a second CUDA stream (WgradStream): nothing on the chain's
critical path (BN finalize -> dy -> data gradient -> next block) reads them, so they fill the SMs
that the small GEMMs and elementwise passes of a batch-128 step leave idle. Off by default until
a GPU run times it (benches/step_table.py; benches/gpu_check.sh runs the variant).
"""
import os
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .bn import bn_apply, bn_bwd_apply, bn_bwd_finalize, bn_bwd_reduce, bn_finalize
from .implicit_gemm import BwdOperand, Xform, conv_gemm, conv_out_size, conv_wgrad, gemv, make_geom
from .weights import kernel_weights, torch_view


@dataclass(frozen=True)
class BlockSpec:
    transposed: bool
    stride: int
    padding: int
    act: int          # activation code (activations.ACTIVATIONS)
    slope: float      # LeakyReLU negative_slope
    bn: bool
    training: bool    # BN from batch statistics (and running-stat update) vs running stats
    momentum: float
    eps: float


@dataclass
class BlockOut:
    y: object         # raw conv output, NHWC (kept for backward / consumed through xform)
    a: object         # materialized activation, NHWC, or None
    xform: object     # Xform turning y into the activation (for a consumer's prologue)
    mean: object      # per-channel fp32 BN vectors (None without BN)
    rstd: object
    geom: object


def materialize_dy():
    """FASTDCGAN_MATERIALIZE_DY, 1 by default (read at each call): see the module docstring."""
    return os.environ.get("FASTDCGAN_MATERIALIZE_DY", "1") != "0"


def materialize_act():
    """FASTDCGAN_MATERIALIZE_ACT, 1 by default (read at each call): a chain of blocks writes each
    activation out and the consumer reads it raw (kernels/network.py)."""
    return os.environ.get("FASTDCGAN_MATERIALIZE_ACT", "1") != "0"


class WgradStream:
    """A second CUDA stream for weight gradients, forked from the current stream per launch and
    joined once by join(). The tensors a launch reads stay referenced until the join: the
    caching allocator may hand a freed block to the current stream's next allocation at once, so
    a tensor the side stream still reads must not be freed before the current stream has waited
    for it."""

    _streams = {}   # device index -> stream (one per device, reused by every backward)

    def __init__(self, device):
        if device.index not in self._streams:
            self._streams[device.index] = torch.cuda.Stream(device=device)
        self.stream = self._streams[device.index]
        self.device = device
        self.reading = []

    @classmethod
    def for_tensor(cls, t):
        """A WgradStream for t's device when FASTDCGAN_WGRAD_STREAM=1 and t is on CUDA, else
        None (read at each call)."""
        if t.device.type != "cuda" or os.environ.get("FASTDCGAN_WGRAD_STREAM", "0") != "1":
            return None
        return cls(t.device)

    def launch(self, fn, *reads):
        """fn() on the side stream, after everything queued so far on the current stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            fn()
        self.reading.append(reads)

    def join(self):
        """The current stream waits for every launch; their inputs may then be freed."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.reading.clear()


def _is_gemv(spec, x, cout):
    # kernel covers the whole 4x4 input and the output has too few channels for a tensor-core tile
    return (not spec.transposed and spec.stride == 1 and spec.padding == 0 and not spec.bn
            and x.shape[1] == 4 and x.shape[2] == 4 and cout < 16)


def block_forward(x, pro, wk, gamma, beta, running_mean, running_var, spec, *, keep_y, materialize,
                  batches_tracked=None, groups=1):
    """x: NHWC input, through the prologue `pro` (Xform of its producer) or raw (pro None); wk:
    the kernel-layout weight in x's dtype. keep_y: store the raw conv output (needed for
    backward). materialize: return the activation. batches_tracked: BatchNorm2d's counter, to
    add 1 to per batch statistics computed. groups: the batch is that many equal groups of
    images, each normalized by its own statistics (BN vectors [groups * C])."""
    nb, ih, iw, _ = x.shape
    cout = wk.shape[3]
    oh = conv_out_size(spec.transposed, spec.stride, spec.padding, ih)
    ow = conv_out_size(spec.transposed, spec.stride, spec.padding, iw)
    geom = make_geom(spec.transposed, spec.stride, spec.padding, ih, iw, oh, ow)
    if spec.bn and spec.training:
        y, _, partials = conv_gemm(x, wk, geom, cout, pro=pro, stats=1, groups=groups)
        mean, rstd, scale, shift = bn_finalize(partials, gamma, beta, running_mean, running_var,
                                               training=True, momentum=spec.momentum, eps=spec.eps,
                                               batches_tracked=batches_tracked, groups=groups)
        xform = Xform(scale, shift, spec.act, spec.slope)
        a = bn_apply(y, scale, shift, spec.act, spec.slope, y.dtype, groups) if materialize else None
        return BlockOut(y, a, xform, mean, rstd, geom)
    mean = rstd = scale = shift = None
    if spec.bn:
        mean, rstd, scale, shift = bn_finalize(None, gamma, beta, running_mean, running_var,
                                               training=False, momentum=0.0, eps=spec.eps,
                                               groups=groups)
    xform = Xform(scale, shift, spec.act, spec.slope)
    store_a = materialize or not keep_y
    if _is_gemv(spec, x, cout):
        y, a = gemv(x, wk, cout, pro=pro, epi=xform, store_y=keep_y, store_a=store_a, groups=groups)
    else:
        y, a, _ = conv_gemm(x, wk, geom, cout, pro=pro, store_y=keep_y, epi=xform, store_a=store_a,
                            groups=groups)
    return BlockOut(y, a, xform, mean, rstd, geom)


def block_backward(g, x, pro, wk, gamma, out, spec, *, need_dx, need_dw, dw=None, bn_grads=None,
                   partials=None, prod=None, prod_act=None, g_is_dy=False, groups=1,
                   wgrad_stream=None):
    """g: NHWC gradient w.r.t. the block's activation (g_is_dy: already through the activation,
    for a block without BatchNorm whose consumer's data gradient applied it). x / pro: the block
    input as in forward; wk the kernel-layout weight of the forward. dw: fp32 kernel-layout
    buffer the weight gradient is added to (None: a new one); bn_grads: (gamma.grad, beta.grad)
    to add dgamma, dbeta to (None: new tensors). partials: BN backward sums of this block already
    reduced (by the consumer's dgrad epilogue). prod: (y, scale, shift, mean, rstd, act, slope)
    of the producer of x, when its BN backward sums should be fused into this block's dgrad
    epilogue; prod_act: (y, act, slope) of a producer without BatchNorm, whose activation's
    derivative the dgrad epilogue then applies (dx comes back through it). groups: as in
    block_forward. wgrad_stream: a WgradStream to run the weight gradient on when it goes into
    a given dw (the caller joins it before reading dw).
    Returns (dx, dW, dgamma, dbeta, producer partials); dW in kernel layout. out.y may be None
    when nothing is to be applied to g (no BatchNorm, g_is_dy)."""
    y = out.y
    if spec.bn:
        xf = out.xform
        if partials is None:
            partials = bn_bwd_reduce(g, y, xf.scale, xf.shift, out.mean, out.rstd, spec.act,
                                     spec.slope, groups)
        count = y.numel() // y.shape[-1]
        dgamma, dbeta, ca, cb, cc = bn_bwd_finalize(partials, gamma, out.mean, out.rstd, count,
                                                    training=spec.training, grads=bn_grads,
                                                    groups=groups)
        bo = BwdOperand(g, y, xf.scale, xf.shift, ca, cb, cc, spec.act, spec.slope)
    else:
        dgamma = dbeta = None
        bo = BwdOperand(g, y, None, None, None, None, None, 0 if g_is_dy else spec.act, spec.slope)
    if bo.scale is None and bo.act == 0:
        dy = g   # nothing to apply: both GEMMs read g as it is
    elif materialize_dy() and (need_dw or need_dx):
        dy = bn_bwd_apply(bo, groups)
    else:
        dy = None
    operand = bo if dy is None else dy
    off_path = need_dw and dw is not None and wgrad_stream is not None
    if need_dw and not off_path:
        dw = conv_wgrad(x, pro, operand, out.geom, dw, groups)
    dx = prod_partials = None
    if need_dx:
        nb, ih, iw, cin = x.shape
        geom = make_geom(not spec.transposed, spec.stride, spec.padding, out.geom.oh, out.geom.ow,
                         ih, iw)
        dx, _, prod_partials = conv_gemm(dy, wk, geom, cin, w_t=True, bwd=bo if dy is None else None,
                                         stats=2 if prod else 0, prod=prod, grad_act=prod_act,
                                         groups=groups)
    if off_path:
        # queued after the data gradient, which the rest of the chain waits for
        wgrad_stream.launch(lambda: conv_wgrad(x, pro, operand, out.geom, dw, groups), x, pro,
                            operand)
    return dx, dw if need_dw else None, dgamma, dbeta, prod_partials


class BlockFunction(torch.autograd.Function):
    """Autograd for one block with a materialized NCHW-shaped input and output (the public ops);
    tensors are viewed as NHWC (free for channels_last tensors, which is what the ops return)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, running_mean, running_var, spec):
        xh = x.permute(0, 2, 3, 1).contiguous()
        wk = kernel_weights([weight], [spec.transposed], xh.dtype)[0]
        out = block_forward(xh, None, wk, gamma, beta, running_mean, running_var, spec,
                            keep_y=True, materialize=True)
        ctx.spec, ctx.geom, ctx.weight_dtype = spec, out.geom, weight.dtype
        xf = out.xform
        ctx.save_for_backward(xh, wk, gamma, out.y, out.mean, out.rstd, xf.scale, xf.shift)
        return out.a.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xh, wk, gamma, y, mean, rstd, scale, shift = ctx.saved_tensors
        spec = ctx.spec
        out = BlockOut(y, None, Xform(scale, shift, spec.act, spec.slope), mean, rstd, ctx.geom)
        g = grad.permute(0, 2, 3, 1).contiguous().to(y.dtype)
        need = ctx.needs_input_grad
        dx, dw, dgamma, dbeta, _ = block_backward(g, xh, None, wk, gamma, out, spec,
                                                  need_dx=need[0], need_dw=need[1])
        if dx is not None:
            dx = dx.permute(0, 3, 1, 2)
        if dw is not None:
            dw = torch_view(dw, spec.transposed).to(ctx.weight_dtype)
        if dgamma is not None:
            dgamma, dbeta = dgamma.to(gamma.dtype), dbeta.to(gamma.dtype)
        return dx, dw, dgamma if need[2] else None, dbeta if need[3] else None, None, None, None


def run_block(x, weight, gamma, beta, running_mean, running_var, spec):
    """Dispatches through autograd when a gradient is needed, else straight to the kernels."""
    needs = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, gamma, beta))
    if needs:
        return BlockFunction.apply(x, weight, gamma, beta, running_mean, running_var, spec)
    with torch.no_grad():
        xh = x.permute(0, 2, 3, 1).contiguous()
        wk = kernel_weights([weight], [spec.transposed], xh.dtype)[0]
        out = block_forward(xh, None, wk, gamma, beta, running_mean, running_var, spec,
                            keep_y=False, materialize=True)
        return out.a.permute(0, 3, 1, 2)
