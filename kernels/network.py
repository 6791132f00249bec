"""A whole chain of blocks (a DCGAN Generator or Discriminator) as ONE autograd Function.

Forward: per block one GEMM (+ BN finalize, + one elementwise pass writing the activation
act(y*scale + shift) from the raw conv output y, which the next block's GEMMs read as it is).

Backward, from the last block down: BN coefficients -> weight gradient (split-K) -> data gradient
whose epilogue also reduces the producer's BN backward sums (sum dz, sum dz*xhat with
dz = g*act'(z) recomputed from the producer's saved y), so each block's backward is two GEMMs,
two tiny finalize kernels and the elementwise pass writing dy (kernels/block.py). A producer
without BatchNorm (D's first block) gets its gradient through its activation straight from that
epilogue, so its own GEMMs read it as it is, with no pass. With FASTDCGAN_WGRAD_STREAM=1 the
weight gradients that go into .grad run on a second stream (kernels/block.py: WgradStream),
joined before backward returns.

Weights are read in kernel layout (kernels/weights.py), cast for all blocks at once; inside
weights.training_step() the weight and BN-parameter gradients are accumulated by the kernels
straight into the parameters' .grad (autograd then gets None for them).

With FASTDCGAN_MATERIALIZE_ACT=0 no activation but the last is written: the next block's GEMMs,
forward and weight gradient, read y through their prologue (act(y*scale + shift) with the
producer's BN vectors) instead, saving the pass and the activations kept for backward, at the
price of a transform in their main loops repeated per tap, phase and column tile (the default,
materialized, has the leaner loops: benches/compile_check.py --loops, benches/gemm_model.py;
benches/step_table.py --feeds times both on a GPU).

groups > 1: the input is that many equal batches, each with its own BatchNorm statistics (as if
the chain ran on each in turn), in one pass: the training step's D scores real and fake images
so, with half the launches and twice the rows per GEMM.
"""
import functools

import torch
from torch.autograd.function import once_differentiable

from .activations import ACTIVATIONS
from .block import BlockOut, WgradStream, block_backward, block_forward, materialize_act
from .implicit_gemm import Xform, conv_out_size, make_geom
from .weights import grad_sink, kernel_weights, torch_view

_PER_BLOCK = 6   # weight, gamma, beta, running_mean, running_var, num_batches_tracked
_FIRST = 3       # NetworkFunction's inputs before the blocks' tensors: x, specs, groups
_SAVED = 8       # tensors saved per block: kernel weight, gamma, y, mean, rstd, scale, shift, act


class NetworkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, specs, groups, *tensors):
        cur, pro = x.permute(0, 2, 3, 1).contiguous(), None
        xh = cur
        wks = _kernel_weights(specs, tensors, cur.dtype)
        mat_act = materialize_act()
        outs = []
        for i, spec in enumerate(specs):
            _, gamma, beta, rm, rv, nbt = tensors[_PER_BLOCK * i:_PER_BLOCK * (i + 1)]
            last = i == len(specs) - 1
            out = block_forward(cur, pro, wks[i], gamma, beta, rm, rv, spec,
                                keep_y=last or not (mat_act and _output_gives_grad(spec)),
                                materialize=mat_act or last, batches_tracked=nbt, groups=groups)
            outs.append(out)
            cur, pro = (out.a, None) if mat_act else (out.y, out.xform)
        ctx.specs, ctx.groups = specs, groups
        ctx.geoms = [o.geom for o in outs]
        # the parameters themselves (leaves, not saved tensors): backward looks up their .grad
        ctx.params = [tensors[_PER_BLOCK * i:_PER_BLOCK * i + 3] for i in range(len(specs))]
        saved = [xh]
        for i, o in enumerate(outs):
            # the activation is kept when it was materialized for the next block to read
            saved += [wks[i], tensors[_PER_BLOCK * i + 1], o.y, o.mean, o.rstd,
                      o.xform.scale, o.xform.shift, o.a if mat_act and i < len(outs) - 1 else None]
        ctx.save_for_backward(*saved)
        return outs[-1].a.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        xh, specs = saved[0], ctx.specs
        blocks = []
        for i, spec in enumerate(specs):
            w, gamma, y, mean, rstd, scale, shift, a = saved[1 + _SAVED * i:1 + _SAVED * (i + 1)]
            out = BlockOut(y, a, Xform(scale, shift, spec.act, spec.slope), mean, rstd, ctx.geoms[i])
            blocks.append((w, gamma, out))
        need = ctx.needs_input_grad
        # grads: x, specs, groups, then (weight, gamma, beta, rm, rv, num_batches_tracked) per block
        grads = [None] * (_FIRST + _PER_BLOCK * len(specs))
        # a block's dgrad is needed when anything below it wants a gradient
        below = [need[0]]
        for i in range(1, len(specs)):
            base = _FIRST + _PER_BLOCK * (i - 1)
            below.append(below[-1] or any(need[base:base + 3]))
        g = grad.permute(0, 2, 3, 1).contiguous().to(blocks[-1][2].y.dtype)
        partials, g_is_dy = None, False
        wgrad_stream = WgradStream.for_tensor(g)
        for i in reversed(range(len(specs))):
            w, gamma, out = blocks[i]
            spec = specs[i]
            prod = prod_act = None
            if i == 0:
                x, pro = xh, None
            else:
                pw, pgamma, pout = blocks[i - 1]
                pspec = specs[i - 1]
                # the block's input: the producer's activation as materialized, or its raw output
                # through the prologue
                x, pro = (pout.a, None) if pout.a is not None else (pout.y, pout.xform)
                if pspec.bn:
                    prod = (pout.y, pout.xform.scale, pout.xform.shift, pout.mean, pout.rstd,
                            pspec.act, pspec.slope)
                elif pspec.act != 0:
                    # a producer without BatchNorm (D's first block): its gradient leaves this
                    # dgrad through its activation (read off its output where its raw one was
                    # not kept: _output_gives_grad)
                    prod_act = (pout.a if pout.y is None else pout.y, pspec.act, pspec.slope)
            base = _FIRST + _PER_BLOCK * i
            weight, gparam, bparam = ctx.params[i]
            dw_sink = grad_sink(weight, spec.transposed) if need[base] else None
            bn_sinks = None
            if spec.bn and need[base + 1] and need[base + 2]:
                bn_sinks = (grad_sink(gparam), grad_sink(bparam))
                if any(t is None for t in bn_sinks):
                    bn_sinks = None
            dx, dw, dgamma, dbeta, prev_partials = block_backward(
                g, x, pro, w, gamma, out, spec, need_dx=below[i], need_dw=need[base],
                dw=dw_sink, bn_grads=bn_sinks, partials=partials, prod=prod, prod_act=prod_act,
                g_is_dy=g_is_dy, groups=ctx.groups, wgrad_stream=wgrad_stream)
            if dw is not None and dw_sink is None:
                grads[base] = torch_view(dw, spec.transposed).to(weight.dtype)
            if spec.bn and bn_sinks is None:
                grads[base + 1] = dgamma.to(gamma.dtype) if need[base + 1] else None
                grads[base + 2] = dbeta.to(gamma.dtype) if need[base + 2] else None
            g, partials, g_is_dy = dx, prev_partials, prod_act is not None
            if not below[i]:
                break
        if wgrad_stream is not None:
            wgrad_stream.join()
        if need[0]:
            grads[0] = g.permute(0, 3, 1, 2)
        return tuple(grads)


def _output_gives_grad(spec):
    """A block without BatchNorm whose activation's derivative is the same read off its output
    as off its input (ReLU, LeakyReLU with a non-negative slope). Its backward needs its raw
    output only for that derivative (applied by the consumer's dgrad epilogue), so with its
    activation materialized the raw output is not stored."""
    return not spec.bn and (spec.act == ACTIVATIONS["relu"] or (
        spec.act == ACTIVATIONS["leaky_relu"] and spec.slope >= 0))


def _kernel_weights(specs, tensors, dtype):
    return kernel_weights([tensors[_PER_BLOCK * i] for i in range(len(specs))],
                          [spec.transposed for spec in specs], dtype)


# the smallest GEMM row tile (tl.dot's minimum): with batch groups, each row tile must lie in one
# group, so a group's rows per phase must be whole tiles
_MIN_ROW_TILE = 16


@functools.lru_cache(maxsize=64)
def grouping_error(shape, convs, groups):
    """None if a chain of convolutions `convs` (a tuple of (transposed, stride, padding), kernel
    4) on an NCHW input of `shape` can run with `groups` batch groups, else the reason. The forward
    and data-gradient GEMMs must have a multiple of 16 rows per group and phase, so that no row
    tile straddles two groups (the weight gradient slices its rows per group). Cached: the model
    asks before each grouped call, and fused_network checks again."""
    nb, _, h, w = shape
    if groups < 1 or nb % groups:
        return f"a batch of {nb} does not split into {groups} equal groups"
    per_group = nb // groups
    for i, (transposed, stride, padding) in enumerate(convs):
        oh = conv_out_size(transposed, stride, padding, h)
        ow = conv_out_size(transposed, stride, padding, w)
        for geom in (make_geom(transposed, stride, padding, h, w, oh, ow),
                     make_geom(not transposed, stride, padding, oh, ow, h, w)):
            rows = per_group * geom.mh * geom.mw
            if rows % _MIN_ROW_TILE:
                return (f"block {i}: {per_group} images per group give {rows} GEMM rows per "
                        f"phase, not a multiple of {_MIN_ROW_TILE}")
        h, w = oh, ow
    return None


def run_network(x, specs, tensors, groups=1):
    """Runs the chain; tensors = (weight, gamma, beta, running_mean, running_var,
    num_batches_tracked) per block (None where absent). groups: x is that many equal groups of
    images, each with its own BatchNorm statistics (kernels/bn.py)."""
    needs = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *tensors))
    if needs:
        return NetworkFunction.apply(x, tuple(specs), groups, *tensors)
    with torch.no_grad():
        cur, pro = x.permute(0, 2, 3, 1).contiguous(), None
        wks = _kernel_weights(specs, tensors, cur.dtype)
        mat_act = materialize_act()
        for i, spec in enumerate(specs):
            _, gamma, beta, rm, rv, nbt = tensors[_PER_BLOCK * i:_PER_BLOCK * (i + 1)]
            out = block_forward(cur, pro, wks[i], gamma, beta, rm, rv, spec, keep_y=False,
                                materialize=mat_act or i == len(specs) - 1, batches_tracked=nbt,
                                groups=groups)
            cur, pro = (out.y, out.xform) if out.a is None else (out.a, None)
        return cur.permute(0, 3, 1, 2)
