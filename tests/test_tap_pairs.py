"""Paired column taps (conv_gemm_kernel PAIR): a stride-2 transposed conv's phase GEMM, or a
stride-2 conv's GEMM, computes two column taps from one A tile and moves one tap's accumulator
by a row. Checked against float64 PyTorch and against one tap per K step (FASTDCGAN_TAP_PAIRS=0)
on the same inputs: outputs, BN partials of both kinds (forward statistics, the producer's BN
backward sums), the gradient through a producer's activation, batch groups, and the maps, channel
counts and operand prologues (pairs take raw operands only) that keep one tap per K step.

CPU (Triton interpreter, exact fp32 dot). On a GPU the whole networks run paired
(test_models_triton.py), and test_gpu_tiles.py runs a training step at GPU tiles in CI.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdcgan.kernels import implicit_gemm as ig
from fastdcgan.kernels.activations import ACTIVATIONS
from fastdcgan.kernels.weights import kernel_view
from precision import DEV, interpreter_only, nchw, nhwc, rel_err, vec

pytestmark = [pytest.mark.usefixtures("poison"), interpreter_only]

SLOPE = 0.2


def run(monkeypatch, pairs, fn):
    """fn() with paired taps on or off, and whether conv_gemm_kernel ran paired."""
    monkeypatch.setenv("FASTDCGAN_TAP_PAIRS", "1" if pairs else "0")
    seen = []
    launch = ig.launch

    def record(kernel, grid, args, consts, *a, **kw):
        seen.append(consts["PAIR"])
        return launch(kernel, grid, args, consts, *a, **kw)

    monkeypatch.setattr(ig, "launch", record)
    out = fn()
    monkeypatch.setattr(ig, "launch", launch)
    assert len(seen) == 1
    return out, seen[0]


def same(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert rel_err(a, b) < tol


def forward_case(b, cin, cout, hw, prologue, groups, transposed=True):
    """A (transposed) conv forward (stride 2, padding 1) with BN statistics in the epilogue (and
    the folded BN + ReLU output): its callable and the float64 reference of y."""
    x = torch.randn(b, hw, hw, cin, device=DEV)
    w = torch.randn(*((cin, cout) if transposed else (cout, cin)), 4, 4, device=DEV) * 0.1
    wk = kernel_view(w, transposed).contiguous()
    oh = ig.conv_out_size(transposed, 2, 1, hw)
    geom = ig.make_geom(transposed, 2, 1, hw, hw, oh, oh)
    z = x.double()
    pro = None
    if prologue:
        pro = ig.Xform(vec(cin * groups, 0.5, 1.5), vec(cin * groups), ACTIVATIONS["relu"], 0.0)
        s, t = (v.double().view(groups, 1, 1, 1, cin) for v in (pro.scale, pro.shift))
        z = (z.view(groups, b // groups, hw, hw, cin) * s + t).clamp_min(0).view_as(z)
    epi = ig.Xform(vec(cout * groups, 0.5, 1.5), vec(cout * groups), ACTIVATIONS["relu"], 0.0)
    conv = F.conv_transpose2d if transposed else F.conv2d
    ref = nhwc(conv(nchw(z), w.double(), stride=2, padding=1))
    return (lambda: ig.conv_gemm(x, wk, geom, cout, pro=pro, epi=epi, store_a=True, stats=1,
                                 groups=groups)), ref


def dgrad_case(b, cin, cout, hw, feed, through, transposed=False):
    """The data gradient of a (transposed) conv (stride 2, padding 1, cin -> cout, dy hw x hw):
    dy read raw or through the BN backward (feed "bn"), the producer's BN backward sums in the
    epilogue (through None) or the gradient carried through its activation (through: its name)."""
    w = torch.randn(*((cin, cout) if transposed else (cout, cin)), 4, 4, device=DEV) * 0.1
    wk = kernel_view(w, transposed).contiguous()
    ih = hw // 2 if transposed else 2 * hw   # the forward's input map
    geom = ig.make_geom(not transposed, 2, 1, hw, hw, ih, ih)
    g = torch.randn(b, hw, hw, cout, device=DEV)
    if feed == "raw":
        bwd, dy = None, g.double()
    else:
        yb = torch.randn_like(g)
        s, sh, ca, cb, cc = (vec(cout, 0.5, 1.5), vec(cout), vec(cout, 0.5, 1.5), vec(cout),
                             vec(cout))
        bwd = ig.BwdOperand(g, yb, s, sh, ca, cb, cc, ACTIVATIONS["leaky_relu"], SLOPE)
        zb = yb.double() * s.double() + sh.double()
        dy = (ca.double() * g.double() * torch.where(zb > 0, 1.0, SLOPE).double()
              + cb.double() * yb.double() + cc.double())
    if transposed:   # the data gradient of a transposed conv is the strided conv
        ref = nhwc(F.conv2d(nchw(dy), w.double(), stride=2, padding=1))
    else:
        ref = nhwc(torch.nn.grad.conv2d_input((b, cin, ih, ih), w.double(), nchw(dy), stride=2,
                                              padding=1))
    ey = torch.randn(b, ih, ih, cin, device=DEV)
    if through is None:
        prod = (ey, vec(cin, 0.5, 1.5), vec(cin), vec(cin), vec(cin, 0.5, 1.5),
                ACTIVATIONS["relu"], 0.0)
        kw = dict(stats=2, prod=prod)
    else:
        kw = dict(grad_act=(ey, ACTIVATIONS[through], SLOPE))
        ref = ref * torch.where(ey.double() > 0, 1.0, SLOPE if through == "leaky_relu" else 0.0)
    return (lambda: ig.conv_gemm(g if bwd is None else None, wk, geom, cin, w_t=True, bwd=bwd,
                                 **kw)), ref


FORWARD = [  # (batch, cin, cout, hw, batch groups, transposed)
    (2, 16, 32, 4, 1, True),    # G's second layer's 4x4 -> 8x8
    (3, 32, 16, 8, 1, True),    # odd batch
    (1, 16, 24, 16, 1, True),   # 16-pixel rows; Cout 24: a masked column tile
    (4, 16, 16, 8, 2, True),    # D's grouped pass layout: groups with their own BN vectors
    (2, 16, 8, 32, 1, True),    # 2048 rows: the interpreter's 512-row tiles
    (2, 16, 32, 8, 1, False),   # D's layers: 8x8 -> 4x4
    (3, 32, 16, 16, 1, False),
    (4, 16, 24, 16, 2, False),  # D's grouped pass
    (1, 16, 16, 64, 1, False),  # 1024 rows of 32 pixels: 512-row tiles
]
DGRAD = [  # (batch, conv cin, conv cout, dy hw, producer activation or its BN sums, transposed)
    (2, 16, 32, 4, None, False),
    (3, 32, 16, 8, None, False),
    (2, 16, 64, 16, "leaky_relu", False),   # D's first layer's producer: no BN
    (1, 48, 16, 8, "relu", False),
    (2, 32, 16, 8, None, True),    # G's: the strided conv of dy
    (3, 64, 32, 4, None, True),
    (2, 128, 16, 4, None, False),  # 128 GEMM columns (D's wider layers)
    (2, 96, 16, 8, None, True),    # 96: a masked column tile
]


@pytest.mark.parametrize("case", FORWARD, ids=lambda c: "{}_b{}_{}to{}_{}x{}_g{}".format(
    "tconv" if c[5] else "conv", *c[:4], c[3], c[4]))
def test_forward(case, monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    b, cin, cout, hw, groups, transposed = case
    fn, ref = forward_case(b, cin, cout, hw, False, groups, transposed)
    (y, a, partials), paired = run(monkeypatch, True, fn)
    (y0, a0, partials0), unpaired = run(monkeypatch, False, fn)
    assert paired and not unpaired
    same(y, ref)
    same(a, a0)
    for got, want in zip(partials, partials0):   # per-tile (mean, M2, count)
        same(got, want)


@pytest.mark.parametrize("case", DGRAD, ids=lambda c: "{}_b{}_{}to{}_{}x{}_{}".format(
    "tconv" if c[5] else "conv", *c[:4], c[3], c[4] or "bnsums"))
def test_data_gradient(case, monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    b, cin, cout, hw, through, transposed = case
    fn, ref = dgrad_case(b, cin, cout, hw, "raw", through, transposed)
    (y, _, partials), paired = run(monkeypatch, True, fn)
    (y0, _, partials0), unpaired = run(monkeypatch, False, fn)
    assert paired and not unpaired
    same(y, ref)
    if partials is not None:   # sum(dz), sum(dz * xhat) per tile
        for got, want in zip(partials, partials0):
            same(got, want)


@pytest.mark.parametrize("case, why", [
    (("forward", 2, 16, 16, 3, True, False), "3-pixel rows: a tile is never whole image rows"),
    (("forward", 2, 16, 16, 6, True, False), "6-pixel rows"),
    (("forward", 2, 24, 16, 4, True, False), "Cin 24: K blocks straddle the row taps"),
    (("forward", 2, 16, 16, 7, False, False), "odd width: the last tap 3 reads a pixel"),
    (("forward", 2, 16, 16, 12, False, False), "6-pixel output rows"),
    (("forward", 3, 32, 16, 8, True, True), "through the producer's BN + ReLU (a prologue)"),
    (("forward", 2, 16, 32, 8, False, True), "the same, strided"),
    (("dgrad", 2, 24, 16, 4, False, False), "K of 24 channels"),
    (("dgrad", 2, 16, 16, 3, True, False), "an odd map: the last tap 3 reads a pixel"),
    (("dgrad", 3, 16, 32, 8, False, True), "dy through the BN backward (a prologue)"),
    (("dgrad", 3, 32, 64, 4, True, True), "the same, strided"),
])
def test_shapes_and_feeds_that_keep_one_tap_per_k_step(case, why, monkeypatch):
    kind, b, cin, cout, hw, transposed, prologue = case
    if kind == "forward":
        fn, ref = forward_case(b, cin, cout, hw, prologue, 1, transposed)
    else:   # the dgrad's GEMM output channels are the conv's cin
        fn, ref = dgrad_case(b, cout, cin, hw, "bn" if prologue else "raw", None, transposed)
    (y, *_), paired = run(monkeypatch, True, fn)
    assert not paired, why
    assert rel_err(y, ref) < 1e-3
