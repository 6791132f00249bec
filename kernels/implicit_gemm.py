"""Implicit-GEMM convolution kernels (NHWC) shared by every conv / transposed-conv block.

One geometry covers all the DCGAN convolutions (kernel 4) as dense GEMMs with no zero insertion:
for an output phase (ph, pw) in a PHW x PHW grid, GEMM row m = (n, mh, mw), GEMM column = output
channel co, reduction k = (th, tw, ci) over T x T taps (ci fastest, contiguous in NHWC):

    out[n, mh*OS + ph, mw*OS + pw, co] =
        sum_{th, tw, ci} x[n, mh*IS + ph*PIN + IOFF + th*TSTEP, (same for w), ci] * W[kh, kw, ci, co]

    Conv2d(s, p):            PHW=1, T=4, IS=s, OS=1, PIN=0, TSTEP=+1, IOFF=-p
    ConvTranspose2d(s2, p1): PHW=2, T=2, IS=1, OS=2, PIN=1, TSTEP=-1, IOFF=0   (the 4 phase GEMMs:
                             even rows y[2a] = x[a]w[1] + x[a-1]w[3], odd y[2a+1] = x[a+1]w[0] + x[a]w[2])
    ConvTranspose2d(s1, p0) from a 1x1 map (G's first layer, z @ W): PHW=4, T=1
                             (16 GEMMs [B, nz] @ [nz, Cout], one per output pixel)
    ConvTranspose2d(s1, p0) otherwise: PHW=1, T=4, TSTEP=-1 (a conv with the flipped kernel)

Conv2d's data gradient is ConvTranspose2d's forward and vice versa, so the same kernel is the
dgrad of either. Taps falling outside the input are masked (zero AFTER the prologue transform).

Weights are read in place in their kernel layout W[kh, kw, ci, co] (kernels/weights.py: the
forward conv's input and output channels, contiguous), tap (th, tw) of phase (ph, pw) being
kernel tap kh = weight_tap(ph, th) (kw likewise); the data gradient reads the same tensor with
its two channel dims swapped (W_T), and the weight gradient is written in that layout too. So no
weight is ever repacked per phase or per direction.

Operand prologues (MODE): 0 raw; 1 a = act(x*scale + shift) (the producer's BN-apply and activation,
so a whole network runs on raw conv outputs); 2 dy = A*g*act'(y*scale + shift) + B*y + C (the BN +
activation backward, from the saved conv output y and the incoming gradient g).

A stride-2 transposed conv with few output channels (G's last layer, D's first layer's data
gradient; INPUT_STATIONARY_MAX_COUT) is not phase GEMMs but input-stationary: a GEMM over the
input pixels producing each pixel's 16 taps' contributions, summed per output pixel by a second
pass (tap_gemm_kernel, tap_sum_kernel; its weight gradient likewise: tconv_wgrad_kernel).

With FASTDCGAN_TMA=1 (off until a GPU run times it), the forward and data-gradient GEMMs on raw
operands load both tiles as TMA boxes through tensor descriptors (_tma_taps, _tma_descriptors):
the copy engine moves them and zero-fills the padding, so the K loop holds no address or mask
arithmetic (sm_90 SASS: 105-137 instructions per warp and K step, against 135-208 for the
cp.async loops of the same tiles), where a row tile is whole rows of a power-of-two map.

With FASTDCGAN_TAP_PAIRS=1, stride-2 convs and transposed convs on raw operands pair their column
taps (PAIR, _paired_taps): one A tile feeds two kernel columns' accumulators, the second moved by
an output column before the sum, so the input is loaded half as often as one tap per K step
would. Off by default: the H100's bf16 step was faster without (B=128 1.61 -> 1.51 ms, B=512
5.03 -> 4.90), the fewer loads not paying for the second accumulator and the move.
"""
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from .activations import act_grad, apply_act
from .grid import cdiv, next_power_of_2, pow2_divisor
from .memory import new_empty
from .pdl import grid_dependency_wait, launch_options, major_capability
from .weights import k_major

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tile configs are chosen per layer shape: from the measured tile table (tile_table) when it has
# the shape, else by the heuristics gemm_tiles / wgrad_tiles. FASTDCGAN_AUTOTUNE=1 lets
# triton.autotune pick between each heuristic launch site's two candidates on the GPU (a short
# benchmark per shape, but every candidate is one more compile of seconds, so it is opt-in).
AUTOTUNE = not INTERPRET and os.environ.get("FASTDCGAN_AUTOTUNE", "0") == "1"


def fp32_precision():
    """tl.dot input precision for fp32 operands: "tf32" (default, like cuDNN's allow_tf32) or
    "ieee" (exact fp32), from FASTDCGAN_FP32_PRECISION at call time."""
    p = os.environ.get("FASTDCGAN_FP32_PRECISION", "tf32").lower()
    if p not in ("tf32", "ieee"):
        raise ValueError(f"FASTDCGAN_FP32_PRECISION must be 'tf32' or 'ieee', got {p!r}")
    return p


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geom:
    phw: int     # output phases per spatial dim
    t: int       # taps per spatial dim per phase
    in_s: int    # input step per GEMM row step (IS)
    out_s: int   # output step per GEMM row step (OS)
    pin: int     # input shift per phase (PIN)
    tstep: int   # input step per tap (TSTEP)
    ioff: int    # input offset (IOFF)
    ih: int
    iw: int
    oh: int
    ow: int
    mh: int      # GEMM rows per image per phase = mh * mw
    mw: int

    @property
    def phases(self):
        return self.phw * self.phw


def conv_out_size(transposed, stride, padding, size):
    return (size - 1) * stride - 2 * padding + 4 if transposed else (size + 2 * padding - 4) // stride + 1


def make_geom(transposed, stride, padding, ih, iw, oh, ow):
    """Geometry of a kernel-4 (transposed) convolution mapping an ih x iw map to oh x ow."""
    if not transposed:
        return Geom(1, 4, stride, 1, 0, 1, -padding, ih, iw, oh, ow, oh, ow)
    if stride == 2:   # padding 1
        return Geom(2, 2, 1, 2, 1, -1, 0, ih, iw, oh, ow, (oh + 1) // 2, (ow + 1) // 2)
    if ih == 1 and iw == 1:   # stride 1, padding 0
        return Geom(4, 1, 1, 1, 0, 0, 0, ih, iw, oh, ow, 1, 1)
    return Geom(1, 4, 1, 1, 0, -1, padding, ih, iw, oh, ow, oh, ow)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rows(rm, MH, MW, ph, pw, IOFF, IS: tl.constexpr, OS: tl.constexpr, PIN: tl.constexpr):
    # GEMM row m -> image n, first input tap (ih0, iw0) and output pixel (oh, ow) of phase (ph, pw).
    # Rows are never negative: unsigned division by the (constant) sizes is a shift and a mask
    # where they are powers of two, without the rounding fix-up of a signed one.
    ru = rm.to(tl.uint32)
    n = (ru // (MH * MW)).to(tl.int32)
    r = ru % (MH * MW)
    mh = (r // MW).to(tl.int32)
    mw = (r % MW).to(tl.int32)
    return n, mh * IS + ph * PIN + IOFF, mw * IS + pw * PIN + IOFF, mh * OS + ph, mw * OS + pw


@triton.jit
def _k_coords(k0, rk, CIN, ALIGNED: tl.constexpr):
    # Tap and channel of the reduction indices k0 + rk (k = (th, tw, ci)). ALIGNED
    # (CIN % BLOCK_K == 0): the whole K block lies in one tap, so the tap is a scalar; otherwise
    # (CIN = 3, nz = 100, ...) it is decoded per k, so taps pack densely into K instead of padding
    # each tap's channels to BLOCK_K.
    if ALIGNED:
        tap = k0 // CIN
        ci = tl.multiple_of(k0 - tap * CIN, 16) + rk
    else:
        kk = k0 + rk
        tap = kk // CIN
        ci = kk % CIN
    return tap, ci


@triton.jit
def _im2col(k0, rk, xrow, ih0, iw0, row_ok, CIN, IH, IW, KTOT,
            T: tl.constexpr, TSTEP: tl.constexpr, ALIGNED: tl.constexpr):
    # Offsets/mask of the [BLOCK_M, BLOCK_K] operand tile at reduction offset k0, and its
    # (tap, ci) coordinates; spatial bounds per row (ALIGNED) or per element.
    tap, ci = _k_coords(k0, rk, CIN, ALIGNED)
    if ALIGNED:
        ih = ih0 + (tap // T) * TSTEP
        iw = iw0 + (tap % T) * TSTEP
        ok = row_ok & (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW)
        offs = (xrow + (ih * IW + iw) * CIN)[:, None] + ci[None, :]
        ok = tl.broadcast_to(ok[:, None], offs.shape)
    else:
        ih = ih0[:, None] + ((tap // T) * TSTEP)[None, :]
        iw = iw0[:, None] + ((tap % T) * TSTEP)[None, :]
        ok = row_ok[:, None] & (k0 + rk < KTOT)[None, :] & (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW)
        offs = xrow[:, None] + (ih * IW + iw) * CIN + ci[None, :]
    return offs, ok, ci, tap


@triton.jit
def _weight_tap(p, t, PHW: tl.constexpr):
    # kernel row kh of tap t in output phase p (the same for columns): transposed stride 2
    # (PHW 2) kh = 1 - p + 2t; from a 1x1 map (PHW 4, one tap) kh = p; dense (PHW 1) kh = t
    if PHW == 2:
        return 1 - p + 2 * t
    elif PHW == 4:
        return p + 0 * t
    else:
        return t + 0 * p


@triton.jit
def _weight_offsets(tap, ci, rn, ph, pw, CIN, COUT, PHW: tl.constexpr, T: tl.constexpr,
                    W_T: tl.constexpr):
    # Offsets of the [BLOCK_K, BLOCK_N] tile B[k = (tap, ci), n] in the kernel-layout weight
    # W[kh, kw, c_in, c_out] (tap: a scalar, or per k for flat K). W_T: this GEMM runs the conv
    # the other way (data gradient), its K channels are W's c_out and its N channels W's c_in.
    kh = _weight_tap(ph, tap // T, PHW)
    kw = _weight_tap(pw, tap % T, PHW)
    base = (kh * 4 + kw) * (CIN * COUT)
    if W_T:
        return (base + ci)[:, None] + rn[None, :] * CIN
    else:
        return (base + ci * COUT)[:, None] + rn[None, :]


@triton.jit
def _load_operand(x_ptr, g_ptr, offs, ok, ch, C, s_ptr, b_ptr, ca_ptr, cb_ptr, cc_ptr, slope,
                  MODE: tl.constexpr, AFFINE: tl.constexpr, ACT: tl.constexpr):
    # Loads a GEMM operand tile applying the prologue MODE; ch = channel of each column. MODE 0
    # returns the tile in storage dtype (the load feeds tl.dot directly: cp.async-pipelined);
    # the prologues compute in fp32.
    v = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if MODE == 1:
        v = v.to(tl.float32)
        if AFFINE:
            cm = ch < C
            v = v * tl.load(s_ptr + ch, mask=cm, other=0.0)[None, :] \
                + tl.load(b_ptr + ch, mask=cm, other=0.0)[None, :]
        v = tl.where(ok, apply_act(v, ACT, slope), 0.0)
    elif MODE == 2:
        v = v.to(tl.float32)
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if AFFINE:
            cm = ch < C
            z = v * tl.load(s_ptr + ch, mask=cm, other=0.0)[None, :] \
                + tl.load(b_ptr + ch, mask=cm, other=0.0)[None, :]
            v = tl.load(ca_ptr + ch, mask=cm, other=0.0)[None, :] * g * act_grad(z, ACT, slope) \
                + tl.load(cb_ptr + ch, mask=cm, other=0.0)[None, :] * v \
                + tl.load(cc_ptr + ch, mask=cm, other=0.0)[None, :]
            v = tl.where(ok, v, 0.0)
        else:
            v = g * act_grad(v, ACT, slope)
    return v


@triton.jit
def _through_act_grad(acc, ey_ptr, optr, omask, ACT: tl.constexpr, slope):
    # a data gradient carried through the activation of a producer without BatchNorm, whose saved
    # output ey sits at the output positions optr
    yp = tl.load(ey_ptr + optr, mask=omask, other=0.0).to(tl.float32)
    return acc * act_grad(yp, ACT, slope)


@triton.jit
def _store_act(acc, a_ptr, optr, omask, s_ptr, b_ptr, ch, ch_ok, AFFINE: tl.constexpr,
               ACT: tl.constexpr, slope):
    # stores act(acc*scale + shift) (the BN folded into per-channel vectors, or no BN)
    v = acc
    if AFFINE:
        v = v * tl.load(s_ptr + ch, mask=ch_ok, other=0.0)[None, :] \
            + tl.load(b_ptr + ch, mask=ch_ok, other=0.0)[None, :]
    v = apply_act(v, ACT, slope)
    tl.store(a_ptr + optr, v.to(a_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _tap_pair_pass(acc, x_ptr, w_ptr, xrow, ih0, iw, col, row_ok, rk, rn, col_ok, ph, pw,
                   tw_same, tw_moved, s, CIN: tl.constexpr, COUT: tl.constexpr, IH: tl.constexpr,
                   IW: tl.constexpr, MW: tl.constexpr, PHW: tl.constexpr, T: tl.constexpr,
                   TSTEP: tl.constexpr, W_T: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # acc plus two column taps of every row tap (K = T row taps x CIN) from one A tile, the input
    # columns iw of the tile's rows (col: a row's output column). Column tap tw_same reads exactly
    # those; tap tw_moved reads what the tile's row s further on (s = +-1) loads, so the products
    # with its weights belong s rows back: its accumulator moves by s rows before the sum. The
    # move stays inside the tile (BLOCK_M is a multiple of the image row's MW outputs); the rows it
    # would take from beyond an image row (col + s outside [0, MW)) read the zero padding there.
    acc_moved = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, T * CIN, BLOCK_K):
        offs, ok, ci, th = _im2col(k0, rk, xrow, ih0, iw, row_ok, CIN, IH, IW, T * CIN, 1, TSTEP,
                                   True)
        a = tl.load(x_ptr + offs, mask=ok, other=0.0)
        b_same = tl.load(w_ptr + _weight_offsets(th * T + tw_same, ci, rn, ph, pw, CIN, COUT, PHW,
                                                 T, W_T), mask=col_ok[None, :], other=0.0)
        b_moved = tl.load(w_ptr + _weight_offsets(th * T + tw_moved, ci, rn, ph, pw, CIN, COUT,
                                                  PHW, T, W_T), mask=col_ok[None, :], other=0.0)
        a = a.to(b_same.dtype)
        acc = tl.dot(a, b_same, acc, input_precision=DOT_PREC)
        acc_moved = tl.dot(a, b_moved, acc_moved, input_precision=DOT_PREC)
    src = tl.minimum(tl.maximum(tl.arange(0, BLOCK_M) + s, 0), BLOCK_M - 1)
    moved = tl.gather(acc_moved, tl.broadcast_to(src[:, None], [BLOCK_M, BLOCK_N]), 0)
    return acc + tl.where(((col + s >= 0) & (col + s < MW))[:, None], moved, 0.0)


@triton.jit
def _paired_taps(x_ptr, w_ptr, xrow, ih0, iw0, mw, row_ok, rk, rn, col_ok, ph, pw,
                 CIN: tl.constexpr, COUT: tl.constexpr, IH: tl.constexpr, IW: tl.constexpr,
                 MW: tl.constexpr, PHW: tl.constexpr, T: tl.constexpr, TSTEP: tl.constexpr,
                 W_T: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The accumulator of a stride-2 conv with its column taps in pairs that share A tiles
    # (_tap_pair_pass; raw operands), [BLOCK_M, 2*BLOCK_N] of accumulators at a time, and one row
    # gather a pair. Transposed (PHW 2), phase (ph, pw): taps tw = pw (input column mw) and
    # 1 - pw (mw + 2*pw - 1): the input is read 8 times, not 16 (2 row taps x 4 phases). Strided
    # (PHW 1): taps 2 and 0 (columns 2*ow + 1, 2*ow - 1), then 1 and 3 (2*ow, 2*ow + 2): the input
    # is read twice, not 4 times. The pairs whose moved tap would need the column beyond an image
    # row's end read the padding there: conv_gemm pairs only maps whose row ends are padding
    # (stride 2, padding 1).
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PHW == 2:
        acc = _tap_pair_pass(acc, x_ptr, w_ptr, xrow, ih0, mw, mw, row_ok, rk, rn, col_ok, ph, pw,
                             pw, 1 - pw, 2 * pw - 1, CIN, COUT, IH, IW, MW, PHW, T, TSTEP, W_T,
                             DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = _tap_pair_pass(acc, x_ptr, w_ptr, xrow, ih0, iw0 + 2, mw, row_ok, rk, rn, col_ok, ph,
                             pw, 2, 0, -1, CIN, COUT, IH, IW, MW, PHW, T, TSTEP, W_T, DOT_PREC,
                             BLOCK_M, BLOCK_N, BLOCK_K)
        acc = _tap_pair_pass(acc, x_ptr, w_ptr, xrow, ih0, iw0 + 1, mw, row_ok, rk, rn, col_ok, ph,
                             pw, 1, 3, 1, CIN, COUT, IH, IW, MW, PHW, T, TSTEP, W_T, DOT_PREC,
                             BLOCK_M, BLOCK_N, BLOCK_K)
    return acc


@triton.jit
def _tma_taps(xd, wd, pid_m, pid_n, ph, pw, CIN, COUT, MH, MW, IOFF, PHW: tl.constexpr,
              T: tl.constexpr, IS: tl.constexpr, PIN: tl.constexpr, TSTEP: tl.constexpr,
              W_T: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # conv_gemm_kernel's K loop on raw operands loaded as TMA boxes (TMA: xd, wd are tensor
    # descriptors, _tma_descriptors): the copy engine moves each tile, with no per-element
    # address or mask arithmetic in the loop, and zero-fills taps beyond the input's edges (the
    # padding). The row tile is whole output rows: x's box is [images, rows, MW, BLOCK_K] at
    # the tap's first input row and column (stride 1); a stride-2 conv sees x as
    # [N, IH/2, 2, IW/2, 2*CIN], where input row 2*i + r is (i + floor(r/2), r mod 2), so a
    # tap's every-other rows and columns are one box [images, rows, 1, MW, BLOCK_K] too.
    m0 = pid_m * BLOCK_M
    n0 = m0 // (MH * MW)
    mh0 = (m0 // MW) % MH
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, T * T * CIN, BLOCK_K):
        tap = k0 // CIN
        c0 = k0 - tap * CIN
        th = tap // T
        tw = tap % T
        # the tap's input offset from (IS*mh, IS*mw) of the tile's output rows (>= -2)
        rh = ph * PIN + IOFF + th * TSTEP
        rw = pw * PIN + IOFF + tw * TSTEP
        if IS == 2:
            a = xd.load([n0, mh0 + (rh + 2) // 2 - 1, (rh + 2) % 2, (rw + 2) // 2 - 1,
                         (rw + 2) % 2 * CIN + c0])
        else:
            a = xd.load([n0, mh0 + rh, rw, c0])
        a = tl.reshape(a, [BLOCK_M, BLOCK_K])
        wrow = _weight_tap(ph, th, PHW) * 4 + _weight_tap(pw, tw, PHW)
        if W_T:
            b = tl.trans(wd.load([wrow * COUT + pid_n * BLOCK_N, c0]))
        else:
            b = wd.load([wrow * CIN + c0, pid_n * BLOCK_N])
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def conv_gemm_kernel(
    x_ptr, g_ptr, w_ptr, y_ptr, a_ptr,
    ps_ptr, pb_ptr, pca_ptr, pcb_ptr, pcc_ptr,
    es_ptr, eb_ptr, em_ptr, er_ptr, ey_ptr,
    st0_ptr, st1_ptr, cnt_ptr,
    M, GROUP_TILES, pro_slope, epi_slope, xd, wd,
    CIN: tl.constexpr, COUT: tl.constexpr, IH: tl.constexpr, IW: tl.constexpr, OH: tl.constexpr,
    OW: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr, IOFF: tl.constexpr,
    PRO: tl.constexpr, PRO_AFFINE: tl.constexpr, PRO_ACT: tl.constexpr,
    STORE_Y: tl.constexpr, STORE_A: tl.constexpr, EPI_AFFINE: tl.constexpr, EPI_ACT: tl.constexpr,
    STATS: tl.constexpr, EPI_GRAD: tl.constexpr, GROUPED: tl.constexpr,
    PHW: tl.constexpr, T: tl.constexpr, IS: tl.constexpr, OS: tl.constexpr, PIN: tl.constexpr,
    TSTEP: tl.constexpr, ALIGNED: tl.constexpr, W_T: tl.constexpr, DOT_PREC: tl.constexpr,
    PAIR: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    # One program: a [BLOCK_M output pixels, BLOCK_N output channels] tile of one phase, K looped
    # in BLOCK_K steps. Grid (column tiles, phases, row tiles), scheduled axis 0 fastest: the
    # programs running together take the column tiles and the phases of the same rows (a
    # transposed conv's phases read the same input window), so the im2col rows come from DRAM
    # about once and the weight (small) stays in L2.
    # Epilogue: STORE_Y raw accumulator; STORE_A act(acc*es + eb); STATS 1: per-tile (count, mean,
    # M2) of acc for BN (row phase*num_m_tiles + pid_m of the partials); STATS 2: per-tile sums of
    # dz = acc*act'(z) and dz*xhat of the producer layer whose saved output ey sits at the same
    # positions (the chained network's dgrad fuses the next BN backward reduction here).
    # EPI_GRAD: the output is acc*act'(ey) -- a data gradient carried through the activation of a
    # producer without BatchNorm, whose saved output ey sits at the same positions.
    # GROUPED (batch groups: BatchNorm per group of images, kernels/bn.py): a group's rows of a
    # phase are GROUP_TILES whole row tiles, so the tile's group is a scalar; it selects the
    # [group, C] rows of the prologue's and epilogue's BN vectors, and the partial rows are
    # ordered (group, phase, tile) so that bn_finalize reads each group's rows together.
    # PAIR (a stride-2 conv or transposed conv on raw operands, BLOCK_M a multiple of MW): column
    # taps in pairs share their A tiles (_paired_taps). TMA: raw operands as TMA boxes
    # (_tma_taps; xd, wd: their tensor descriptors).
    grid_dependency_wait(PDL)
    pid_n = tl.program_id(0)
    phase = tl.program_id(1)
    pid_m = tl.program_id(2)
    ph = phase // PHW
    pw = phase % PHW
    if GROUPED:
        group = pid_m // GROUP_TILES
        srow = (group * tl.num_programs(1) + phase) * GROUP_TILES + pid_m % GROUP_TILES
    else:
        group = 0
        srow = phase * tl.num_programs(2) + pid_m
    pro_g = group * CIN
    epi_g = group * COUT
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n, ih0, iw0, oh, ow = _rows(rm, MH, MW, ph, pw, IOFF, IS, OS, PIN)
    row_ok = (rm < M) & (oh < OH) & (ow < OW)
    xrow = n * (IH * IW * CIN)
    rk = tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < COUT
    if TMA:
        tl.static_assert(PRO == 0, "TMA boxes hold raw operands")
        acc = _tma_taps(xd, wd, pid_m, pid_n, ph, pw, CIN, COUT, MH, MW, IOFF, PHW, T, IS, PIN,
                        TSTEP, W_T, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    elif PAIR:
        tl.static_assert(PRO == 0, "column taps pair on raw operands only")
        acc = _paired_taps(x_ptr, w_ptr, xrow, ih0, iw0, (iw0 - pw * PIN - IOFF) // IS, row_ok,
                           rk, rn, col_ok, ph, pw, CIN, COUT, IH, IW, MW, PHW, T, TSTEP, W_T,
                           DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        KTOT = T * T * CIN
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, KTOT, BLOCK_K):
            offs, ok, ci, tap = _im2col(k0, rk, xrow, ih0, iw0, row_ok, CIN, IH, IW, KTOT, T,
                                        TSTEP, ALIGNED)
            a = _load_operand(x_ptr, g_ptr, offs, ok, ci, CIN, ps_ptr + pro_g, pb_ptr + pro_g,
                              pca_ptr + pro_g, pcb_ptr + pro_g, pcc_ptr + pro_g, pro_slope, PRO,
                              PRO_AFFINE, PRO_ACT)
            b = tl.load(w_ptr + _weight_offsets(tap, ci, rn, ph, pw, CIN, COUT, PHW, T, W_T),
                        mask=(k0 + rk < KTOT)[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PREC)

    optr = ((n * (OH * OW) + oh * OW + ow) * COUT)[:, None] + rn[None, :]
    omask = row_ok[:, None] & col_ok[None, :]
    if EPI_GRAD:
        acc = _through_act_grad(acc, ey_ptr, optr, omask, EPI_ACT, epi_slope)
    if STORE_Y:
        tl.store(y_ptr + optr, acc.to(y_ptr.dtype.element_ty), mask=omask)
    if STATS == 1:
        cnt = tl.sum(row_ok.to(tl.float32), 0)
        mean_t = tl.sum(tl.where(omask, acc, 0.0), 0) / tl.maximum(cnt, 1.0)
        d = tl.where(omask, acc - mean_t[None, :], 0.0)
        tl.store(st0_ptr + srow * COUT + rn, mean_t, mask=col_ok)
        tl.store(st1_ptr + srow * COUT + rn, tl.sum(d * d, 0), mask=col_ok)
        tl.store(cnt_ptr + srow, cnt)
    if STATS == 2:
        yp = tl.load(ey_ptr + optr, mask=omask, other=0.0).to(tl.float32)
        s = tl.load(es_ptr + epi_g + rn, mask=col_ok, other=0.0)[None, :]
        b = tl.load(eb_ptr + epi_g + rn, mask=col_ok, other=0.0)[None, :]
        mu = tl.load(em_ptr + epi_g + rn, mask=col_ok, other=0.0)[None, :]
        r = tl.load(er_ptr + epi_g + rn, mask=col_ok, other=0.0)[None, :]
        dz = tl.where(omask, acc * act_grad(yp * s + b, EPI_ACT, epi_slope), 0.0)
        tl.store(st0_ptr + srow * COUT + rn, tl.sum(dz, 0), mask=col_ok)
        tl.store(st1_ptr + srow * COUT + rn, tl.sum(dz * (yp - mu) * r, 0), mask=col_ok)
    if STORE_A:
        _store_act(acc, a_ptr, optr, omask, es_ptr + epi_g, eb_ptr + epi_g, rn, col_ok, EPI_AFFINE,
                   EPI_ACT, epi_slope)


@triton.jit
def conv_wgrad_kernel(
    x_ptr, g_ptr, y_ptr, dw_ptr,
    ps_ptr, pb_ptr, qs_ptr, qb_ptr, qca_ptr, qcb_ptr, qcc_ptr,
    M, SPLIT, M_SPLIT, GROUP_ROWS, GROUP_SPLIT, pro_slope, out_slope,
    CIN: tl.constexpr, COUT: tl.constexpr, IH: tl.constexpr, IW: tl.constexpr, OH: tl.constexpr,
    OW: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr, IOFF: tl.constexpr,
    PRO: tl.constexpr, PRO_AFFINE: tl.constexpr, PRO_ACT: tl.constexpr,
    OUT_MODE: tl.constexpr, OUT_AFFINE: tl.constexpr, OUT_ACT: tl.constexpr, GROUPED: tl.constexpr,
    PHW: tl.constexpr, T: tl.constexpr, IS: tl.constexpr, OS: tl.constexpr, PIN: tl.constexpr,
    TSTEP: tl.constexpr, ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    # Weight gradient dW[taps of phase] = im2col(x)^T @ dy as a split-K GEMM: one program owns a
    # [BLOCK_K weight rows (th, tw, ci), BLOCK_N output channels] tile and one of SPLIT slices of
    # the (huge) pixel reduction, and adds its fp32 partial into dw (kernel layout; every weight
    # tap belongs to exactly one phase) with atomics, so dw may already hold a gradient. The forward
    # input comes through the producer's prologue (MODE 1) and dy through the BN/act backward
    # prologue (MODE 2), so neither is materialized. GROUPED (batch groups): each group of
    # GROUP_ROWS rows per phase is cut into GROUP_SPLIT of the slices, so a program's rows lie in
    # one group, whose [group, C] BN vectors both prologues read.
    grid_dependency_wait(PDL)
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    ph = phase // PHW
    pw = phase % PHW
    k0 = pid_k * BLOCK_K
    rk = tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < COUT
    KTOT = T * T * CIN
    if GROUPED:
        group = split // GROUP_SPLIT
        m_lo = group * GROUP_ROWS + split % GROUP_SPLIT * M_SPLIT
        m_hi = tl.minimum(group * GROUP_ROWS + GROUP_ROWS, m_lo + M_SPLIT)
    else:
        group = 0
        m_lo = split * M_SPLIT
        m_hi = tl.minimum(M, m_lo + M_SPLIT)
    pro_g = group * CIN
    out_g = group * COUT
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        n, ih0, iw0, oh, ow = _rows(rm, MH, MW, ph, pw, IOFF, IS, OS, PIN)
        row_ok = (rm < m_hi) & (oh < OH) & (ow < OW)
        offs, ok, ci, _ = _im2col(k0, rk, n * (IH * IW * CIN), ih0, iw0, row_ok, CIN, IH, IW,
                                  KTOT, T, TSTEP, ALIGNED)
        a = _load_operand(x_ptr, x_ptr, offs, ok, ci, CIN, ps_ptr + pro_g, pb_ptr + pro_g, ps_ptr,
                          ps_ptr, ps_ptr, pro_slope, PRO, PRO_AFFINE, PRO_ACT)
        optr = ((n * (OH * OW) + oh * OW + ow) * COUT)[:, None] + rn[None, :]
        dy = _load_operand(y_ptr, g_ptr, optr, row_ok[:, None] & col_ok[None, :], rn, COUT,
                           qs_ptr + out_g, qb_ptr + out_g, qca_ptr + out_g, qcb_ptr + out_g,
                           qcc_ptr + out_g, out_slope, OUT_MODE, OUT_AFFINE, OUT_ACT)
        acc = tl.dot(tl.trans(a.to(x_ptr.dtype.element_ty)), dy.to(x_ptr.dtype.element_ty), acc,
                     input_precision=DOT_PREC)
    tap, ci = _k_coords(k0, rk, CIN, ALIGNED)
    tl.atomic_add(dw_ptr + _weight_offsets(tap, ci, rn, ph, pw, CIN, COUT, PHW, T, False), acc,
                  mask=(k0 + rk < KTOT)[:, None] & col_ok[None, :], sem="relaxed")


@triton.jit
def tconv_wgrad_kernel(
    x_ptr, g_ptr, y_ptr, dw_ptr,
    ps_ptr, pb_ptr, qs_ptr, qb_ptr, qca_ptr, qcb_ptr, qcc_ptr,
    M, M_SPLIT, pro_slope, out_slope,
    CIN: tl.constexpr, COUT: tl.constexpr, IH: tl.constexpr, IW: tl.constexpr, OH: tl.constexpr,
    OW: tl.constexpr,
    PRO: tl.constexpr, PRO_AFFINE: tl.constexpr, PRO_ACT: tl.constexpr,
    OUT_MODE: tl.constexpr, OUT_AFFINE: tl.constexpr, OUT_ACT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    # Weight gradient of a stride-2, padding-1 transposed conv with few output channels (G's last
    # layer: 3), input-stationary: output pixel o = 2i + k - 1 per dim, so
    #     dW[kh, kw, ci, co] = sum over input pixels (n, ih, iw) of
    #                          x[n, ih, iw, ci] * dy[n, 2ih + kh - 1, 2iw + kw - 1, co].
    # GEMM over the input pixels: A = x [pixels, ci] read once (per phase, conv_wgrad_kernel reads
    # it four times, with a 16-wide output tile of which 3 columns count), B[pixel, j] the 16 taps'
    # dy gathered, j = (kh*4 + kw)*COUT + co (48 columns for 3 channels). One program: a
    # [BLOCK_K channels ci, BLOCK_N columns j] tile over a slice of M_SPLIT pixels, added into the
    # fp32 kernel-layout dw with atomics. Operands through their prologues as in conv_wgrad_kernel.
    grid_dependency_wait(PDL)
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    m_lo = tl.program_id(2) * M_SPLIT
    m_hi = tl.minimum(M, m_lo + M_SPLIT)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = rk < CIN
    rj = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = rj < 16 * COUT
    tap = rj // COUT
    co = rj % COUT
    kh = tap // 4
    kw = tap % 4
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < m_hi
        n, ih, iw, _, _ = _rows(rm, IH, IW, 0, 0, 0, 1, 1, 0)   # pixel m -> (n, ih, iw)
        a = _load_operand(x_ptr, x_ptr, (rm * CIN)[:, None] + rk[None, :],
                          row_ok[:, None] & k_ok[None, :], rk, CIN, ps_ptr, pb_ptr, ps_ptr, ps_ptr,
                          ps_ptr, pro_slope, PRO, PRO_AFFINE, PRO_ACT)
        oh = 2 * ih[:, None] + kh[None, :] - 1
        ow = 2 * iw[:, None] + kw[None, :] - 1
        ok = (row_ok[:, None] & j_ok[None, :] & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW))
        optr = ((n[:, None] * OH + oh) * OW + ow) * COUT + co[None, :]
        dy = _load_operand(y_ptr, g_ptr, optr, ok, co, COUT, qs_ptr, qb_ptr, qca_ptr, qcb_ptr,
                           qcc_ptr, out_slope, OUT_MODE, OUT_AFFINE, OUT_ACT)
        acc = tl.dot(tl.trans(a.to(x_ptr.dtype.element_ty)), dy.to(x_ptr.dtype.element_ty), acc,
                     input_precision=DOT_PREC)
    tl.atomic_add(dw_ptr + ((tap * CIN)[None, :] + rk[:, None]) * COUT + co[None, :], acc,
                  mask=k_ok[:, None] & j_ok[None, :], sem="relaxed")


@triton.jit
def tap_gemm_kernel(
    x_ptr, g_ptr, w_ptr, p_ptr, ps_ptr, pb_ptr, pca_ptr, pcb_ptr, pcc_ptr, M, pro_slope,
    CIN: tl.constexpr, COUT: tl.constexpr, PRO: tl.constexpr, PRO_AFFINE: tl.constexpr,
    PRO_ACT: tl.constexpr, W_T: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    # Input-stationary stride-2 transposed conv with few output channels (G's last layer; the
    # data gradient of D's first layer), step 1 of 2: each input pixel's contribution to each of
    # its 16 output pixels (output pixel o = 2i + k - 1 per dim, as in tconv_wgrad_kernel),
    #     P[m, j] = sum_ci x[m, ci] * W[kh, kw, ci, co],   j = (kh*4 + kw)*COUT + co,
    # one [pixels, CIN] @ [CIN, 16*COUT] GEMM that reads x (through its prologue) once: the phase
    # GEMMs read it 8 times (2 row taps x 4 phases, column taps paired), in 16-column tiles of
    # which COUT count, and the operand reads bound them. One program: BLOCK_M input pixels x
    # BLOCK_N columns of P, stored in P's dtype (_tconv_input_stationary).
    # W_T: the data gradient of a conv, whose weight W[kh, kw, co, ci] is read transposed.
    grid_dependency_wait(PDL)
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    rj = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = rj < 16 * COUT
    tap = rj // COUT
    co = rj % COUT
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, CIN, BLOCK_K):
        ci = k0 + rk
        k_ok = ci < CIN
        a = _load_operand(x_ptr, g_ptr, (rm * CIN)[:, None] + ci[None, :],
                          row_ok[:, None] & k_ok[None, :], ci, CIN, ps_ptr, pb_ptr, pca_ptr,
                          pcb_ptr, pcc_ptr, pro_slope, PRO, PRO_AFFINE, PRO_ACT)
        if W_T:
            woff = ((tap * COUT + co) * CIN)[None, :] + ci[:, None]
        else:
            woff = (tap * (CIN * COUT) + co)[None, :] + (ci * COUT)[:, None]
        b = tl.load(w_ptr + woff, mask=k_ok[:, None] & j_ok[None, :], other=0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PREC)
    tl.store(p_ptr + (rm * (16 * COUT))[:, None] + rj[None, :], acc.to(p_ptr.dtype.element_ty),
             mask=row_ok[:, None] & j_ok[None, :])


@triton.jit
def tap_sum_kernel(
    p_ptr, y_ptr, a_ptr, es_ptr, eb_ptr, ey_ptr, NPIX, epi_slope,
    COUT: tl.constexpr, IH: tl.constexpr, IW: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
    STORE_Y: tl.constexpr, STORE_A: tl.constexpr, EPI_AFFINE: tl.constexpr, EPI_ACT: tl.constexpr,
    EPI_GRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    # Step 2 of 2: out[n, oh, ow, co] = the sum of its 4 contributions in P: output row oh comes
    # from kernel rows kh = (oh + 1) % 2 and kh + 2 of input rows ih = (oh + 1 - kh) / 2 (the
    # same for columns); then conv_gemm_kernel's epilogue (no BN statistics). One program:
    # BLOCK_P output pixels x all COUT channels; P's rows are read once over all programs.
    grid_dependency_wait(PDL)
    rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = rp < NPIX
    co = tl.arange(0, BLOCK_C)
    c_ok = co < COUT
    n, _, _, oh, ow = _rows(rp, OH, OW, 0, 0, 0, 1, 1, 0)   # pixel -> (n, oh, ow)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for dh in tl.static_range(2):
        kh = (oh + 1) % 2 + 2 * dh
        ih = (oh + 1 - kh) // 2   # even numerator: exact for -1 too
        for dw in tl.static_range(2):
            kw = (ow + 1) % 2 + 2 * dw
            iw = (ow + 1 - kw) // 2
            ok = p_ok & (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW)
            src = ((n * IH + ih) * IW + iw) * (16 * COUT) + (kh * 4 + kw) * COUT
            acc += tl.load(p_ptr + src[:, None] + co[None, :], mask=ok[:, None] & c_ok[None, :],
                           other=0.0).to(tl.float32)
    optr = (rp * COUT)[:, None] + co[None, :]
    omask = p_ok[:, None] & c_ok[None, :]
    if EPI_GRAD:
        acc = _through_act_grad(acc, ey_ptr, optr, omask, EPI_ACT, epi_slope)
    if STORE_Y:
        tl.store(y_ptr + optr, acc.to(y_ptr.dtype.element_ty), mask=omask)
    if STORE_A:
        _store_act(acc, a_ptr, optr, omask, es_ptr, eb_ptr, co, c_ok, EPI_AFFINE, EPI_ACT,
                   epi_slope)


@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, a_ptr, ps_ptr, pb_ptr, NB, K, CIN, COUT, GROUP_IMAGES,
                pro_slope, epi_slope,
                PRO: tl.constexpr, PRO_AFFINE: tl.constexpr, PRO_ACT: tl.constexpr,
                STORE_Y: tl.constexpr, STORE_A: tl.constexpr, EPI_ACT: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # A conv whose kernel covers the whole input (D's last layer, 4x4 -> 1x1, Cout = 1) is a GEMV
    # out[n, co] = sum_k x[n, k] W[k, co] with k = (h, w, ci) = the NHWC image. One program: BLOCK_B
    # images x one output channel, K streamed in BLOCK_K chunks on CUDA cores (a 16-wide tensor-core
    # tile would be 15/16 padding), fp32 FMAs, the producer's BN + activation applied on load
    # (the BLOCK_B images lie in one batch group of GROUP_IMAGES, whose BN vectors they take).
    grid_dependency_wait(PDL)
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    co = tl.program_id(1)
    pro_g = (tl.program_id(0) * BLOCK_B) // GROUP_IMAGES * CIN
    b_ok = rb < NB
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        v = _load_operand(x_ptr, x_ptr, rb[:, None] * K + kk[None, :], b_ok[:, None] & k_ok[None, :],
                          kk % CIN, CIN, ps_ptr + pro_g, pb_ptr + pro_g, ps_ptr, ps_ptr, ps_ptr,
                          pro_slope, PRO, PRO_AFFINE, PRO_ACT)
        w = tl.load(w_ptr + kk * COUT + co, mask=k_ok, other=0.0).to(tl.float32)
        acc += v * w[None, :]
    out = tl.sum(acc, 1)
    if STORE_Y:
        tl.store(y_ptr + rb * COUT + co, out.to(y_ptr.dtype.element_ty), mask=b_ok)
    if STORE_A:
        tl.store(a_ptr + rb * COUT + co, apply_act(out, EPI_ACT, epi_slope).to(a_ptr.dtype.element_ty),
                 mask=b_ok)


# ----------------------------------------------------------------------------------------------
# Tile configurations and launching
# ----------------------------------------------------------------------------------------------
def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2_clamp(v, lo, hi):
    return max(lo, min(hi, next_power_of_2(max(int(v), 1))))


def _k_block(cin, widest):
    """(BLOCK_K, ALIGNED): the widest power-of-two K block dividing Cin (one tap per K step), else
    a flat K block (Cin = 3: 16, so D's first layer's K = 48 is 3 dense steps; nz = 100: 32)."""
    for bk in (256, 128, 64, 32, 16):
        if bk <= widest and cin % bk == 0:
            return bk, True
    return (16 if cin < 32 else 32), False


def gemm_tiles(m_rows, rows_per_image, cin, cout, dtype):
    """(BLOCK_M, BLOCK_K, ALIGNED, [(BLOCK_N, num_warps, num_stages), ...]) for one GEMM.

    H100: 4-byte tf32 operands take BLOCK_K = 32, bf16 64 (a 64-byte K row either way); 3 (tf32) /
    4 (bf16) cp.async stages of a 128x32 / 128x64 A tile plus the B tile stay under ~110 KB of
    shared memory. BLOCK_N follows Cout (16 for Cout = 3: tl.dot's minimum N). BLOCK_M = 128 when an
    image has >= 64 GEMM rows (all but G's first and D's last two layers), else 64 so that even a
    batch of 128 gives >= 2 row tiles per SM. Tiles depend on the layer shape only, never on the
    batch, so one compiled kernel serves every batch size (compiles cost seconds each). Candidates
    (autotuned only with FASTDCGAN_AUTOTUNE=1) vary BLOCK_N / warps / stages, never BLOCK_M,
    because the BN partials are laid out per BLOCK_M tile. Under the interpreter (cost ~ programs x
    ops; numpy does the rest): 32-row tiles for tiny test GEMMs (several tiles, masked edges), else
    512-row tiles.
    """
    if INTERPRET:
        if m_rows <= 1024:
            return 32, 16, cin % 16 == 0, [(_pow2_clamp(cout, 16, 64), 4, 1)]
        bk, aligned = _k_block(cin, 64)
        return 512, bk, aligned, [(_pow2_clamp(cout, 16, 64), 4, 1)]
    bk, aligned = _k_block(cin, 32 if dtype == torch.float32 else 64)
    bm = 128 if rows_per_image >= 64 else 64
    bn = _pow2_clamp(cout, 16, 128)
    stages = 3 if dtype == torch.float32 else 4
    cands = [(bn, 8 if bm * bn >= 128 * 128 else 4, stages)]
    if bn == 128:
        cands.append((64, 4, stages))
    elif bm * bn >= 64 * 64:
        cands.append((bn, 8 if cands[0][1] == 4 else 4, stages - 1))
    return bm, bk, aligned, cands


def wgrad_tiles(m_rows, taps, cin, cout, dtype, raw=False):
    """(BLOCK_K, ALIGNED, BLOCK_N, [(BLOCK_M, num_warps, num_stages), ...]) for the weight gradient
    of a convolution with `taps` kernel taps per phase (raw: both operands read as stored).

    The output tile is BLOCK_K weight rows (th, tw, ci) x BLOCK_N output channels; the pixel
    reduction streams BLOCK_M rows per step (64, or 32 as the tuning alternative). fp32 tiles load
    in one stage: both operands have the reduction (the pixels) strided, and TF32 wgmma takes B
    K-major only; pipelined, Triton 3.6 transposes B with 4-byte cp.async copies, in one stage it
    loads B with 16-byte LDGs and transposes it in the shared-memory store (H100, fp32 step:
    5.38 -> 4.66 ms at B=128, 20.76 -> 17.92 at B=512). bf16 tiles take 128 weight rows and 4
    stages. Flat K (Cin = 3: 48 weight rows; nz = 100) and
    channel counts under the widest tile (D1's Cin = 64 in bf16: 2 taps per tile) take their rows
    in as few tiles as the widest allows, at least 64: each K tile re-reads all of dy (the bytes
    bound these GEMMs: benches/gemm_model.py), and wgmma needs 64 rows (a 16- or 32-row tile runs
    on mma.sync). Such a tile decodes (tap, ci) per k, which costs the main loop next to nothing
    with Cin a compile-time power of two (compile_check --loops: 193 SASS against 191). bf16 with
    raw operands takes 256 weight rows (3 stages, 147 KB; no spills with 8 warps, its 128
    accumulator registers a thread being what the raw main loop leaves free): dy is re-read
    half as often as with 128, the model's largest weight-gradient bytes."""
    widest = 64 if dtype == torch.float32 else (256 if raw else 128)
    if INTERPRET:
        if m_rows <= 1024:
            return 16, cin % 16 == 0, _pow2_clamp(cout, 16, 64), [(32, 4, 1)]
        bk, aligned = _k_block(cin, 64)
        return bk, aligned, _pow2_clamp(cout, 16, 64), [(512, 4, 1)]
    bk, aligned = _k_block(cin, widest)
    if not aligned or bk < widest <= taps * cin:
        bk, aligned = _pow2_clamp(taps * cin, 64, widest), False
    bn = _pow2_clamp(cout, 16, 128)
    stages = 1 if dtype == torch.float32 else (3 if bk > 128 else 4)
    warps = 8 if bk * bn >= 64 * 128 else 4
    return bk, aligned, bn, [(64, warps, stages), (32, 4, stages)]


# fp32 accumulator registers per thread (tile elements / threads) a GEMM tile may take before its
# operand prologues or epilogue spill: benches/compile_check.py (sm_90 ptxas) measured the data
# gradient (two prologue operands g and y, BN-backward sums in the epilogue) spilling 864 B/thread
# at 128x128 with 4 warps (784 B reading a materialized dy: the epilogue alone) and 688 B at
# 256x128 fp32 with 8 warps, i.e. with the forward's tuned tiles; the weight gradient (both
# operands transformed) 40 B at 128x64 with 4 warps.
# Candidates over the limit get 8 warps, then a halved BLOCK_M (a halved BLOCK_N at BLOCK_M 64).
ACC_REGS = {1: 128, 2: 64, "wgrad": 32}


def _fit_registers(bm, bn, warps, limit):
    """(BLOCK_M, BLOCK_N, num_warps) with BLOCK_M * BLOCK_N <= limit * 32 * num_warps."""
    while bm * bn > limit * 32 * warps:
        if warps < 8:
            warps *= 2
        elif bm > 64:
            bm //= 2
        else:
            bn //= 2
    return bm, bn, warps


# The measured tile table: {tile_key: [BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages]} for
# "gemm" (forward) and "dgrad" (data gradient) keys and [BLOCK_K, BLOCK_N, BLOCK_M, num_warps,
# num_stages] for "wgrad" keys, written by benches/tune_gemm.py on a GPU. Read from
# $FASTDCGAN_TILES, else tiles.json next to this file (measured on an H100; on another GPU its
# tiles are still correct, only maybe not the fastest: re-run the sweep there); ignored under the
# interpreter. Keys carry the batch only as the power-of-two bucket of the GEMM's rows, so the
# tuned batch sizes (128, 512) get their own tiles. A batch between two tuned ones (D's grouped
# pass over real and fake at batch 128 has the rows of a 256 batch) takes their tile where the
# two agree; other batch sizes fall back to the heuristics.
_TILE_TABLE = None
_BUCKETS = None   # tile_key with the rows bucket blanked -> {rows bucket: tile}


def tile_table():
    global _TILE_TABLE, _BUCKETS
    if _TILE_TABLE is None:
        _TILE_TABLE, _BUCKETS = {}, {}
        path = os.environ.get("FASTDCGAN_TILES") or os.path.join(os.path.dirname(__file__), "tiles.json")
        if not INTERPRET and os.path.exists(path):
            with open(path) as f:
                _TILE_TABLE = json.load(f)
        for key, tile in _TILE_TABLE.items():
            shape, rows = _split_rows(key)
            _BUCKETS.setdefault(shape, {})[rows] = tile
    return _TILE_TABLE


def _split_rows(key):
    """A tile key without its rows bucket, and the bucket."""
    head, _, tail = key.partition(" rows")
    bucket, _, dtype = tail.partition(" ")
    return f"{head} {dtype}", int(bucket)


def tile_key(kind, geom, cin, cout, m_rows, dtype, raw=False, boxed=False):
    """raw: the GEMM's operands are read as stored, with no prologue transform (a materialized
    activation or dy; the weight gradient: both operands), whose main loop is leaner and may want
    another tile, so it has keys of its own; boxed: raw operands loaded as TMA boxes
    (FASTDCGAN_TMA=1), keys of their own again."""
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    return (f"{kind} phw{geom.phw} t{geom.t} {geom.ih}x{geom.iw}->{geom.oh}x{geom.ow} "
            f"{cin}->{cout} rows{next_power_of_2(m_rows)} {dt}{' raw' if raw else ''}"
            f"{' tma' if boxed else ''}")


def _tuned_tile(kind, geom, cin, cout, m_rows, dtype, raw, boxed=False):
    """The tile table's entry for this GEMM, or the one of the tuned buckets on both sides of its
    rows when they agree, or None."""
    key = tile_key(kind, geom, cin, cout, m_rows, dtype, raw, boxed)
    tile = tile_table().get(key)
    if tile is not None:
        return tile
    shape, rows = _split_rows(key)
    buckets = _BUCKETS.get(shape, {})
    below = max((r for r in buckets if r < rows), default=None)
    above = min((r for r in buckets if r > rows), default=None)
    if below is not None and above is not None and buckets[below] == buckets[above]:
        return buckets[below]
    return None


_TUNED = {}


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# (kernel, specialization, config) -> the pipeline depth that fits, for configs whose shared
# memory exceeds the GPU's at their tuned depth: a forward shape's tile also serves the other
# network's data gradient, whose prologue stages two A tensors (g and y) per pipeline stage.
_FITTED_STAGES = {}


def _launch_one(kernel, grid, args, consts, cfg):
    def fit_key():
        return (kernel, tuple(sorted(consts.items())), tuple(sorted(cfg.kwargs.items())),
                cfg.num_warps, cfg.num_stages)

    stages = _FITTED_STAGES.get(fit_key(), cfg.num_stages) if _FITTED_STAGES else cfg.num_stages
    while True:
        try:
            kernel[grid(cfg.kwargs)](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps,
                                     num_stages=stages)
            break
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            _FITTED_STAGES[fit_key()] = stages


def launch(kernel, grid, args, consts, cands, key, reset=None):
    """Launches `kernel` with the first candidate config (with fewer pipeline stages if it does
    not fit the GPU's shared memory), or autotunes the candidates (GPU)."""
    configs = [triton.Config(dict(c), num_warps=w, num_stages=s) for c, w, s in cands]
    if not AUTOTUNE or len(configs) == 1:
        _launch_one(kernel, grid, args, consts, configs[0])
        return
    tkey = (kernel, tuple((tuple(sorted(c.items())), w, s) for c, w, s in cands))
    tuned = _TUNED.get(tkey)
    if tuned is None:
        tuned = triton.autotune(configs=configs, key=key, reset_to_zero=reset, do_bench=_bench)(kernel)
        _TUNED[tkey] = tuned
    tuned[grid](*args, **consts)


@dataclass
class Xform:
    """How a stored NHWC tensor becomes an operand: act(t*scale + shift) (scale None: act(t))."""
    scale: object
    shift: object
    act: int
    slope: float


@dataclass
class BwdOperand:
    """dy = A*g*act'(y*scale + shift) + B*y + C per channel (scale None: dy = g*act'(y))."""
    g: torch.Tensor
    y: torch.Tensor
    scale: object
    shift: object
    ca: object
    cb: object
    cc: object
    act: int
    slope: float


def _affine(operand):
    """Whether an Xform / BwdOperand (or None) reads per-channel (so per batch group) vectors."""
    return operand is not None and operand.scale is not None


# fp32 GEMMs with a reduction this short (D's first layer: K = 3*16, G's first: K = nz = 100) are
# memory-bound, so they run in exact fp32 (FMA dots): with plain TF32 their outputs' rounding
# flips the sign of pre-activations near zero, and the ReLU/LeakyReLU derivative with them, which
# the data gradient then carries (cuDNN runs these small-K convolutions in exact fp32). Not 3xTF32: Triton 3.6's "tf32x3" gave D's first layer outputs
# 64% off on the H100 with the weight read N-major (its split B operand goes from registers into
# a transposed 32-bit shared layout for the wgmma); read K-major (k_major) that layer was right
# (forward 1.1e-7 from float64, ieee's 1.2e-7), but the FMA path is the one all GPU tests passed.
EXACT_K_MAX = 128


def _shape_consts(geom, cin, cout, ih, iw):
    """The layer's shape as compile-time constants: each layer compiles to its own kernels anyway
    (its tile and geometry differ), and constants turn the per-row divisions of the pixel index
    (by MH*MW, MW: powers of two in a DCGAN) into shifts and the address arithmetic into
    immediates: the weight gradient decodes a new block of rows every pixel step."""
    return dict(CIN=cin, COUT=cout, IH=ih, IW=iw, OH=geom.oh, OW=geom.ow, MH=geom.mh, MW=geom.mw,
                IOFF=geom.ioff)


def _dot_prec(dtype, ktot=None):
    """tl.dot input_precision of a GEMM over a reduction of ktot (None: a long one)."""
    if dtype != torch.float32:
        return "tf32"   # ignored for 16-bit operands
    prec = fp32_precision()
    if prec == "tf32" and ktot is not None and ktot <= EXACT_K_MAX:
        return "ieee"
    return prec


# A stride-2 transposed conv with at most this many output channels (16 taps x 8 = 128 GEMM
# columns; G's last layer, the data gradient of D's first) runs input-stationary: its forward
# (tap_gemm_kernel + tap_sum_kernel, from conv_gemm) and its weight gradient (tconv_wgrad_kernel).
INPUT_STATIONARY_MAX_COUT = 8


def tap_pairs():
    """FASTDCGAN_TAP_PAIRS, 0 by default (read at each call): 1 has stride-2 convs and transposed
    convs run their column taps in pairs from one A tile (conv_gemm_kernel PAIR); 0 keeps one tap
    per K step (faster on the H100: see the module docstring)."""
    return os.environ.get("FASTDCGAN_TAP_PAIRS", "0") == "1"


def tma():
    """FASTDCGAN_TMA, 0 by default (read at each call): 1 has the forward and data-gradient GEMMs
    on raw operands load their tiles as TMA boxes (conv_gemm_kernel TMA) where the shapes allow
    (_tma_descriptors) and the device has TMA (has_tma). Off until a GPU run times it."""
    return os.environ.get("FASTDCGAN_TMA", "0") == "1"


def has_tma(device):
    """A device whose GEMMs can load TMA boxes: a CUDA GPU of compute capability 9.0 or newer, or
    the interpreter (whose descriptor loads do what TMA does)."""
    if INTERPRET:
        return True
    return device.type == "cuda" and major_capability(device) >= 9


# a TMA box spans at most 256 elements per dimension
TMA_BOX_MAX = 256


def _tma_descriptors(x, w, geom, cin, cout, w_t, bm, bn, bk):
    """(xd, wd): tensor descriptors of conv_gemm_kernel's raw operands for _tma_taps, x the NHWC
    input [N, IH, IW, cin] and w the weight ([4, 4, cin, cout], or [4, 4, cout, cin] with w_t),
    or None where the boxes cannot hold the tiles: a row tile of BLOCK_M rows must be whole rows
    of MW pixels (power-of-two maps), a K block one tap's channels, every row of either tensor
    16-byte aligned (TMA's rule), and a stride-2 input even-sized (its row pairs)."""
    nb, ih, iw, _ = x.shape
    elem = x.element_size()
    mh, mw = geom.mh, geom.mw
    if not (x.is_contiguous() and w.is_contiguous() and x.data_ptr() % 16 == 0
            and w.data_ptr() % 16 == 0 and w.dtype == x.dtype):
        return None
    if cin % bk or (cin * elem) % 16 or (cout * elem) % 16 or (bk * elem) % 16:
        return None
    if mw & (mw - 1) or mh & (mh - 1) or bm % mw:
        return None
    rows = min(mh, bm // mw)
    images = bm // (rows * mw)
    if max(images, rows, mw, bk, bn) > TMA_BOX_MAX:
        return None
    if geom.in_s == 1:
        xd = TensorDescriptor(x, [nb, ih, iw, cin], [ih * iw * cin, iw * cin, cin, 1],
                              [images, rows, mw, bk])
    elif (geom.in_s == 2 and geom.phw == 1 and ih % 2 == 0 and iw % 2 == 0
          and geom.ioff + min(0, (geom.t - 1) * geom.tstep) >= -2):   # _tma_taps' row offsets
        xd = TensorDescriptor(x, [nb, ih // 2, 2, iw // 2, 2 * cin],
                              [ih * iw * cin, 2 * iw * cin, iw * cin, 2 * cin, 1],
                              [images, rows, 1, mw, bk])
    else:
        return None
    if w_t:
        wd = TensorDescriptor(w, [16 * cout, cin], [cin, 1], [bn, bk])
    else:
        wd = TensorDescriptor(w, [16 * cin, cout], [cout, 1], [bk, bn])
    return xd, wd


def pairs_column_taps(geom):
    """Whether a GEMM of this geometry can pair its column taps (_paired_taps): a stride-2
    transposed conv (padding 1), or a stride-2 conv with padding 1 on an even-width map, whose
    pairs' moved taps read the padding beyond each image row's ends."""
    if geom.phw == 2:
        return True
    return (geom.phw == 1 and geom.t == 4 and geom.in_s == 2 and geom.ioff == -1
            and geom.iw == 2 * geom.ow)


def _prologue_args(x, pro, bwd, dummy):
    """(MODE, affine, act, slope, operand, g, [5 vectors]) of a GEMM's A operand: x raw, x through
    its producer's transform `pro` (Xform), or the BN/activation backward `bwd` (BwdOperand)."""
    if bwd is not None:
        pvec = (bwd.scale, bwd.shift, bwd.ca, bwd.cb, bwd.cc) if _affine(bwd) else (dummy,) * 5
        return 2, _affine(bwd), bwd.act, bwd.slope, bwd.y, bwd.g, pvec
    if pro is not None:
        pvec = (pro.scale, pro.shift, dummy, dummy, dummy) if _affine(pro) else (dummy,) * 5
        return 1, _affine(pro), pro.act, pro.slope, x, x, pvec
    return 0, False, 0, 0.0, x, x, (dummy,) * 5


def _epilogue_args(epi, prod, grad_act, stats, dummy):
    """(affine, act, slope, [es, eb, em, er, ey]) of conv_gemm_kernel's epilogue: the producer's
    BN backward sums (stats 2, prod), the gradient through a producer's activation (grad_act),
    or the output's transform epi (Xform or None)."""
    if stats == 2:
        py, ps, pb, pm, pr, e_act, e_slope = prod
        return True, e_act, e_slope, (ps, pb, pm, pr, py)
    if grad_act is not None:
        py, e_act, e_slope = grad_act
        return False, e_act, e_slope, (dummy, dummy, dummy, dummy, py)
    if epi is None:
        return False, 0, 0.0, (dummy,) * 5
    if not _affine(epi):
        return False, epi.act, epi.slope, (dummy,) * 5
    return True, epi.act, epi.slope, (epi.scale, epi.shift, dummy, dummy, dummy)


def _gemm_tile(geom, cin, cout, m, dtype, w_t, mode, boxed=False):
    """(BLOCK_M, BLOCK_K, ALIGNED, PAIR, [(BLOCK_N, num_warps, num_stages), ...]) of a
    conv_gemm_kernel launch with m GEMM rows per phase (w_t: a data gradient; mode: its A
    operand's prologue; boxed: its raw operands may load as TMA boxes), fitted to the kernel's
    register budget (PAIR: before the row tile is shrunk to batch groups, which may still turn
    it off)."""
    # a data gradient without its own tuned tile takes the forward tile of the same geometry (the
    # other network's forward), fitted to its register budget below; boxed operands take the TMA
    # sweep's tiles first (tune_gemm.py --feed tma)
    raw = mode == 0
    tuned = None
    for box_keys in ((True, False) if boxed else (False,)):
        tuned = ((_tuned_tile("dgrad", geom, cin, cout, m * geom.phases, dtype, raw, box_keys)
                  if w_t else None)
                 or _tuned_tile("gemm", geom, cin, cout, m * geom.phases, dtype, raw, box_keys))
        if tuned:
            break
    if tuned:
        bm, bn, bk, warps, stages = tuned
        aligned, cands = cin % bk == 0, [(bn, warps, stages)]
    else:
        bm, bk, aligned, cands = gemm_tiles(m * geom.phases, geom.mh * geom.mw * geom.phases, cin,
                                            cout, dtype)
    # column taps pair on raw operands only: through a prologue the second accumulator spills
    # (compile_check: 16-72 B/thread), and the prologue feed's tuned tiles are unpaired ones
    pair = raw and aligned and pairs_column_taps(geom) and tap_pairs()
    if pair and not tuned and not INTERPRET and cout <= 64 and geom.mh * geom.mw >= 256:
        # one column tile of paired taps: 256 rows, whose [256, 2*64] accumulator is the register
        # budget with 8 warps, so the weight tiles, a third of the operand bytes at 128 rows, are
        # re-read half as often (compile_check, bf16: no spills)
        bm, cands = 256, [(bn, 8, s) for bn, _, s in cands[:1]]
    if not INTERPRET:
        # the data gradient (w_t: with the BN-backward prologue, or reading a materialized dy,
        # and the producer's BN-backward sums in its epilogue) also keeps its pipeline at 3
        # stages (compile_check: 56 B/thread of spills at 4 stages for 128x64 with 4 warps);
        # paired taps hold two accumulators in the main loop but sum them before the epilogue,
        # so a paired data gradient's budget is the forward's (compile_check: no spills at
        # [128, 2*128] with 8 warps, bf16 and fp32, with the BN-backward sums); a strided conv's
        # two K loops (one per pair) with 4 steps each (Cin 64) unroll whole at 3+ stages and
        # spill
        width = 2 if pair else 1
        max_stages = 3 if w_t else 8
        if pair and geom.phw == 1 and geom.t * cin // bk <= 4:
            max_stages = 2
        limit = ACC_REGS[1 if pair or not w_t else 2]
        fitted = [_fit_registers(bm, bn * width, w, limit) + (min(s, max_stages),)
                  for bn, w, s in cands]
        bm = fitted[0][0]
        cands = [(bn // width, w, s) for m_, bn, w, s in fitted if m_ == bm]
    return bm, bk, aligned, pair, cands


def conv_gemm(x, w, geom, cout, *, w_t=False, pro=None, bwd=None, store_y=True, epi=None,
              store_a=False, stats=0, prod=None, grad_act=None, groups=1):
    """Runs conv_gemm_kernel over all phases.

    x: NHWC input [N, IH, IW, CIN] (with prologue `pro`: Xform) or, for the dgrad, `bwd`
    (BwdOperand whose y/g are the input). w: the kernel-layout weight [4, 4, CIN, cout] (an fp32
    forward reads a K-major copy, k_major), or with w_t (the data gradient) [4, 4, cout, CIN].
    Returns (y, a, partials): y the raw output (store_y), a = act(y*epi.scale + epi.shift)
    (store_a), partials per `stats` (1: BN forward (mean_t, m2_t, cnt); 2: BN backward sums of
    the producer `prod` = (y, scale, shift, mean, rstd, act, slope)).
    grad_act: (y, act, slope) of a producer without BatchNorm: y is stored times act'(y there),
    the gradient through that producer's activation (a data gradient's output). groups: the
    batch is that many groups of images with their own BN vectors ([groups * C] each) and
    partial rows; the row tile shrinks to divide a group's rows.
    A stride-2 transposed conv with few output channels and no BN statistics runs input-stationary
    instead (tap_gemm_kernel, tap_sum_kernel); the others pair their column taps where tap_pairs()
    and their tile allow.
    """
    src = bwd.y if bwd is not None else x
    nb, ih, iw, cin = src.shape
    dev, dtype = src.device, src.dtype
    grouped = groups > 1 and bool(stats or _affine(pro) or _affine(bwd) or _affine(epi))
    dummy = w   # stands in for the pointers a specialization does not read
    mode, p_aff, p_act, p_slope, xin, gin, pvec = _prologue_args(x, pro, bwd, dummy)
    e_aff, e_act, e_slope, evec = _epilogue_args(epi, prod, grad_act, stats, dummy)
    shape = (nb, geom.oh, geom.ow, cout)
    y = new_empty(shape, dev, dtype) if store_y else None
    a = new_empty(shape, dev, dtype) if store_a else None
    if geom.phw == 2 and cout <= INPUT_STATIONARY_MAX_COUT and not stats and not grouped:
        _tconv_input_stationary(xin, gin, w, w_t, geom, cout, (mode, p_aff, p_act, p_slope, pvec),
                                y, a, (e_aff, e_act, e_slope, evec), grad_act is not None)
        return y, a, None
    # TF32 wgmma takes its shared-memory B operand K-major only: from the N-major forward weight
    # [4, 4, CIN, cout] Triton transposes every B tile with 4-byte cp.async copies (the fp32
    # forward GEMMs ran 4-9x slower than bf16 on the H100, the data gradients, reading W K-major,
    # 1.5x), so an fp32 forward reads a K-major copy [4, 4, cout, CIN] (W_T's layout) instead
    w_kmajor = w_t or dtype == torch.float32
    if w_kmajor and not w_t:
        w = k_major(w)
    m = nb * geom.mh * geom.mw
    boxes = tma() and mode == 0 and has_tma(dev)   # TMA boxes where the tile allows them
    bm, bk, aligned, pair, cands = _gemm_tile(geom, cin, cout, m, dtype, w_t, mode, boxes)
    group_tiles = None
    if grouped:
        group_rows = (nb // groups) * geom.mh * geom.mw
        bm = pow2_divisor(group_rows, bm)
        if bm < 16:
            raise ValueError(f"a batch group's {group_rows} GEMM rows per phase are not a multiple "
                             "of 16 (the smallest row tile)")
        group_tiles = group_rows // bm
    pair = pair and bm % geom.mw == 0   # a row tile of whole image rows
    descriptors = None
    if boxes and not pair and aligned:
        descriptors = _tma_descriptors(xin, w, geom, cin, cout, w_kmajor, bm, cands[0][0], bk)
    if descriptors:
        # the boxes are made for one BLOCK_N; a pipeline to overlap the copies with the dots
        bn, warps, stages = cands[0]
        cands = [(bn, warps, stages if INTERPRET else max(stages, 3))]
    xd, wd = descriptors or (dummy, dummy)
    n_mt = cdiv(m, bm)
    st0 = st1 = cnt = dummy
    partials = None
    if stats:
        rows = geom.phases * n_mt
        st0 = new_empty((rows, cout), dev)
        st1 = new_empty((rows, cout), dev)
        if stats == 1:
            cnt = new_empty((rows,), dev)
            partials = (st0, st1, cnt)
        else:
            partials = (st0, st1)
    args = (xin, gin, w, y if store_y else dummy, a if store_a else dummy, *pvec, *evec,
            st0, st1, cnt, m, group_tiles or n_mt, float(p_slope), float(e_slope), xd, wd)
    consts = dict(**_shape_consts(geom, cin, cout, ih, iw), PRO=mode, PRO_AFFINE=p_aff,
                  PRO_ACT=p_act, STORE_Y=store_y, STORE_A=store_a, EPI_AFFINE=e_aff, EPI_ACT=e_act,
                  STATS=stats, EPI_GRAD=grad_act is not None, GROUPED=grouped, PHW=geom.phw,
                  T=geom.t, IS=geom.in_s, OS=geom.out_s, PIN=geom.pin, TSTEP=geom.tstep,
                  ALIGNED=aligned, W_T=w_kmajor, DOT_PREC=_dot_prec(dtype, geom.t * geom.t * cin),
                  PAIR=pair, TMA=descriptors is not None, BLOCK_M=bm, BLOCK_K=bk,
                  **launch_options(dev))
    tiles = [({"BLOCK_N": bn}, w, s) for bn, w, s in cands]
    grid = lambda meta: (cdiv(cout, meta["BLOCK_N"]), geom.phases, n_mt)  # noqa: E731
    launch(conv_gemm_kernel, grid, args, consts, tiles,
           key=["M", "CIN", "COUT", "PRO", "STATS", "PHW", "T", "PAIR"])
    return y, a, partials


# Output pixels per tap_sum_kernel program: 4 P rows of 16*COUT fp32 gathered per pixel.
TAP_SUM_BLOCK = 256


def _tconv_input_stationary(xin, gin, w, w_t, geom, cout, prologue, y, a, epilogue,
                            epi_grad):
    """conv_gemm for a stride-2 transposed conv with few output channels, input-stationary: the
    [pixels, CIN] @ [CIN, 16*COUT] GEMM P (tap_gemm_kernel) and the 4-term sum of each output
    pixel's contributions with the epilogue (tap_sum_kernel). prologue / epilogue: conv_gemm's
    (_prologue_args, _epilogue_args) parts; y, a: the outputs (None where not stored)."""
    nb, ih, iw, cin = xin.shape
    mode, p_aff, p_act, p_slope, pvec = prologue
    e_aff, e_act, e_slope, evec = epilogue
    m = nb * ih * iw
    # P, written and read back once, is the layer's largest traffic: an inference pass (no raw
    # output kept for a backward) stores it in the operands' dtype, halving it in bf16. Before a
    # backward it stays fp32: bf16 terms, rounded before their sum, move small outputs by more
    # than one rounding of the sum does, which flips the ReLU' of pre-activations that eager's
    # output keeps (a BN block's data gradient was 11x eager's error off float64).
    p = new_empty((m, 16 * cout), xin.device, xin.dtype if y is None else torch.float32)
    bn = next_power_of_2(16 * cout)
    prec = _dot_prec(xin.dtype, cin)
    if INTERPRET:
        bm, bk, warps, stages = (32 if m <= 1024 else 512), 16, 4, 1
    elif prec == "ieee":
        # an FMA dot holds each thread's rows and columns of both operand tiles for the whole K
        # step: 16-wide steps (tl.dot's least) of a 64-row tile (128 x 64 spilled ~800 B/thread)
        bm, bk, warps, stages = 64, 16, 4, 2
    else:
        # one K step for CIN = 64 (the DCGAN's): nothing to pipeline, so 2 stages, leaving
        # shared memory for several programs per SM
        bm, bk, warps, stages = 128, _pow2_clamp(cin, 16, 64), 4, 2
    tap_gemm_kernel[(cdiv(m, bm), cdiv(16 * cout, bn))](
        xin, gin, w, p, *pvec, m, float(p_slope), CIN=cin, COUT=cout, PRO=mode, PRO_AFFINE=p_aff,
        PRO_ACT=p_act, W_T=w_t, DOT_PREC=prec, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, num_warps=warps, num_stages=stages, **launch_options(xin.device))
    npix = nb * geom.oh * geom.ow
    es, eb, _, _, ey = evec
    tap_sum_kernel[(cdiv(npix, TAP_SUM_BLOCK),)](
        p, y if y is not None else p, a if a is not None else p, es, eb, ey, npix, float(e_slope),
        COUT=cout, IH=ih, IW=iw, OH=geom.oh, OW=geom.ow, STORE_Y=y is not None,
        STORE_A=a is not None, EPI_AFFINE=e_aff, EPI_ACT=e_act, EPI_GRAD=epi_grad,
        BLOCK_P=TAP_SUM_BLOCK, BLOCK_C=next_power_of_2(cout), num_warps=4,
        **launch_options(xin.device))


def conv_wgrad(x, pro, bwd, geom, dw=None, groups=1):
    """Adds sum over pixels of im2col(pro(x))^T @ dy into the fp32 kernel-layout weight gradient
    dw [4, 4, CIN, COUT] (zeros when None) and returns it; dy is a BwdOperand (the BN/activation
    backward applied as it loads) or a materialized NHWC tensor. groups: batch groups with their
    own BN vectors ([groups * C] in pro and dy); the pixel reduction is sliced per group."""
    if isinstance(bwd, torch.Tensor):
        bwd = BwdOperand(bwd, bwd, None, None, None, None, None, 0, 0.0)
        out_mode = 0
    else:
        out_mode = 2
    nb, ih, iw, cin = x.shape
    cout = bwd.y.shape[-1]
    dev, dtype = x.device, x.dtype
    p_aff, q_aff = _affine(pro), _affine(bwd)
    grouped = groups > 1 and (p_aff or q_aff)
    if dw is None:
        dw = torch.zeros(4, 4, cin, cout, device=dev, dtype=torch.float32)
    pvec = (pro.scale, pro.shift) if p_aff else (dw, dw)
    qvec = (bwd.scale, bwd.shift, bwd.ca, bwd.cb, bwd.cc) if q_aff else (dw,) * 5
    if geom.phw == 2 and cout <= INPUT_STATIONARY_MAX_COUT and not grouped:
        return _tconv_wgrad(x, pro, bwd, out_mode, geom, dw, pvec, qvec)
    m = nb * geom.mh * geom.mw
    ktot = geom.t * geom.t * cin
    tuned = _tuned_tile("wgrad", geom, cin, cout, m * geom.phases, dtype,
                        raw=pro is None and out_mode == 0)
    if tuned:
        bk, bn, bm, warps, stages = tuned
        if dtype == torch.float32:
            stages = 1   # as wgrad_tiles says; the table's fp32 tiles were swept pipelined
        aligned, cands = cin % bk == 0, [(bm, warps, stages)]
    else:
        bk, aligned, bn, cands = wgrad_tiles(m * geom.phases, geom.t * geom.t, cin, cout, dtype,
                                             raw=pro is None and out_mode == 0)
    if not INTERPRET:
        cands = [(bm, max(w, min(8, bk * bn // (32 * ACC_REGS["wgrad"]))), s) for bm, w, s in cands]
    if not grouped:
        groups = 1
    group_rows = (nb // groups) * geom.mh * geom.mw
    split = _pixel_split(dev, cdiv(ktot, bk) * cdiv(cout, bn) * geom.phases)
    m_split = _rows_per_slice(m, split, groups)
    group_split = cdiv(group_rows, m_split)
    split = group_split * groups
    args = (x, bwd.g, bwd.y, dw, *pvec, *qvec, m, split, m_split, group_rows, group_split,
            float(pro.slope if pro else 0.0), float(bwd.slope))
    consts = dict(**_shape_consts(geom, cin, cout, ih, iw), PRO=1 if pro is not None else 0,
                  PRO_AFFINE=p_aff, PRO_ACT=pro.act if pro else 0,
                  OUT_MODE=out_mode, OUT_AFFINE=q_aff, OUT_ACT=bwd.act, GROUPED=grouped,
                  PHW=geom.phw, T=geom.t, IS=geom.in_s, OS=geom.out_s, PIN=geom.pin,
                  TSTEP=geom.tstep, ALIGNED=aligned, DOT_PREC=_dot_prec(dtype), BLOCK_N=bn,
                  BLOCK_K=bk, **launch_options(x.device))
    tiles = [({"BLOCK_M": bm}, w, s) for bm, w, s in cands]
    grid = (cdiv(ktot, bk), cdiv(cout, bn), geom.phases * split)
    launch(conv_wgrad_kernel, lambda meta: grid, args, consts, tiles,
           key=["M", "CIN", "COUT", "PRO", "PHW", "T"], reset=["dw_ptr"])
    return dw


def _pixel_split(device, tiles):
    """How many slices a weight gradient with `tiles` output tiles cuts its pixel reduction into:
    ~2 programs per SM (interpreter: 2, to exercise the split and the atomics)."""
    return 2 if INTERPRET else cdiv(2 * _num_sms(device), tiles)


def _rows_per_slice(m, split, groups=1):
    """Pixel rows per slice of a reduction over m rows in `groups` equal batch groups: about
    `split` slices in all, the same number in each group, >= 256 rows each, a multiple of 128."""
    group_split = cdiv(max(1, min(split, cdiv(m, 256))), groups)
    return cdiv(cdiv(m // groups, group_split), 128) * 128


def _tconv_wgrad(x, pro, bwd, out_mode, geom, dw, pvec, qvec):
    """conv_wgrad for a stride-2 transposed conv with few output channels (tconv_wgrad_kernel):
    one [CIN, 16*COUT] GEMM over the input pixels instead of four [4*CIN, COUT] phase GEMMs.
    dw, pvec, qvec: conv_wgrad's output and vector arguments."""
    nb, ih, iw, cin = x.shape
    cout = bwd.y.shape[-1]
    dtype = x.dtype
    m = nb * ih * iw
    bn = next_power_of_2(16 * cout)
    if INTERPRET:
        bk, bm, warps, stages = 16, 32 if m <= 1024 else 512, 4, 1
    else:
        # 64 channels x 64 columns: 32 fp32 accumulators a thread at 4 warps; a 64-pixel step
        # keeps the operands' prologues at 32 elements a thread (fp32 operands: 8 warps, which
        # compile_check found spill-free where 4 spilled)
        bk, bm = min(64, _pow2_clamp(cin, 16, 64)), 64
        warps, stages = (8 if dtype == torch.float32 else 4), 3
    m_split = _rows_per_slice(m, _pixel_split(x.device, cdiv(cin, bk) * cdiv(16 * cout, bn)))
    grid = (cdiv(cin, bk), cdiv(16 * cout, bn), cdiv(m, m_split))
    tconv_wgrad_kernel[grid](
        x, bwd.g, bwd.y, dw, *pvec, *qvec, m, m_split, float(pro.slope if pro else 0.0),
        float(bwd.slope), CIN=cin, COUT=cout, IH=ih, IW=iw, OH=geom.oh, OW=geom.ow,
        PRO=1 if pro is not None else 0, PRO_AFFINE=_affine(pro), PRO_ACT=pro.act if pro else 0,
        OUT_MODE=out_mode, OUT_AFFINE=_affine(bwd), OUT_ACT=bwd.act, DOT_PREC=_dot_prec(dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        **launch_options(x.device))
    return dw


# GEMV: 16 images x 256-wide K chunks per program: [16, 256] fp32 partials = 32 registers per
# thread at 4 warps, and B/16 x Cout programs (8 at B = 128) each stream 16 rows of K = 8192.
GEMV_BLOCK_B, GEMV_BLOCK_K = 16, 256


def gemv(x, w, cout, *, pro=None, epi=None, store_y=True, store_a=False, groups=1):
    """out[n, 0, 0, co] for a conv whose 4x4 kernel covers the whole (4x4) input, no BN; w is the
    kernel-layout weight [4, 4, CIN, cout], i.e. the GEMV's [K = (h, w, ci), cout] matrix. groups:
    batch groups with their own producer BN vectors ([groups * CIN] in pro)."""
    nb, ih, iw, cin = x.shape
    p_aff = _affine(pro)
    if not p_aff:
        groups = 1
    block_b = GEMV_BLOCK_B if groups == 1 else pow2_divisor(nb // groups, GEMV_BLOCK_B)
    k = ih * iw * cin
    shape = (nb, 1, 1, cout)
    y = new_empty(shape, x.device, x.dtype) if store_y else None
    a = new_empty(shape, x.device, x.dtype) if store_a else None
    pvec = (pro.scale, pro.shift) if p_aff else (w, w)
    gemv_kernel[(cdiv(nb, block_b), cout)](
        x, w, y if store_y else w, a if store_a else w, *pvec, nb, k, cin, cout, nb // groups,
        float(pro.slope if pro else 0.0), float(epi.slope if epi else 0.0),
        PRO=1 if pro is not None else 0, PRO_AFFINE=p_aff, PRO_ACT=pro.act if pro else 0,
        STORE_Y=store_y, STORE_A=store_a, EPI_ACT=epi.act if epi else 0,
        BLOCK_B=block_b, BLOCK_K=GEMV_BLOCK_K, **launch_options(x.device))
    return y, a
