"""Paired column taps (conv_gemm_kernel PAIR): a stride-2 transposed conv's phase GEMM computes its
two column taps from one A tile and moves the shifted tap's accumulator by a row. Checked against
float64 PyTorch and against the unpaired phase GEMMs (FASTDCGAN_TAP_PAIRS=0) on the same inputs:
outputs, BN partials of both kinds (forward statistics, the producer's BN backward sums), every
operand prologue, the gradient through a producer's activation, batch groups, and the maps and
channel counts that keep the unpaired kernel.

CPU (Triton interpreter, exact fp32 dot). On a GPU the whole networks run paired
(test_models_triton.py), and test_gpu_tiles.py runs a training step at GPU tiles in CI.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdcgan.kernels import implicit_gemm as ig
from fastdcgan.kernels.activations import ACTIVATIONS
from fastdcgan.kernels.weights import kernel_view
from precision import DEV, interpreter_only, rel_err

pytestmark = [pytest.mark.usefixtures("poison"), interpreter_only]

SLOPE = 0.2


def vec(c, lo=-0.5, hi=0.5):
    return torch.empty(c, device=DEV).uniform_(lo, hi)


def nhwc(t):
    return t.permute(0, 2, 3, 1)


def nchw(t):
    return t.permute(0, 3, 1, 2)


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


def forward_case(b, cin, cout, hw, prologue, groups):
    """A transposed-conv forward (stride 2, padding 1) with BN statistics in the epilogue (and
    the folded BN + ReLU output): its callable and the float64 reference of y."""
    x = torch.randn(b, hw, hw, cin, device=DEV)
    w = torch.randn(cin, cout, 4, 4, device=DEV) * 0.1
    wk = kernel_view(w, True).contiguous()
    geom = ig.make_geom(True, 2, 1, hw, hw, 2 * hw, 2 * hw)
    z = x.double()
    pro = None
    if prologue:
        pro = ig.Xform(vec(cin * groups, 0.5, 1.5), vec(cin * groups), ACTIVATIONS["relu"], 0.0)
        s, t = (v.double().view(groups, 1, 1, 1, cin) for v in (pro.scale, pro.shift))
        z = (z.view(groups, b // groups, hw, hw, cin) * s + t).clamp_min(0).view_as(z)
    epi = ig.Xform(vec(cout * groups, 0.5, 1.5), vec(cout * groups), ACTIVATIONS["relu"], 0.0)
    ref = nhwc(F.conv_transpose2d(nchw(z), w.double(), stride=2, padding=1))
    fn = lambda: ig.conv_gemm(x, wk, geom, cout, pro=pro, epi=epi, store_a=True, stats=1,  # noqa: E731
                              groups=groups)
    return fn, ref


def dgrad_case(b, cin, cout, hw, feed, through):
    """The data gradient of a conv (stride 2, padding 1, cin -> cout on a 2hw x 2hw map): dy read
    raw or through the BN backward (feed "bn"), the producer's BN backward sums in the epilogue
    (through None) or the gradient carried through its activation (through: its name)."""
    w = torch.randn(cout, cin, 4, 4, device=DEV) * 0.1
    wk = kernel_view(w, False).contiguous()
    geom = ig.make_geom(True, 2, 1, hw, hw, 2 * hw, 2 * hw)
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
    ref = nhwc(torch.nn.grad.conv2d_input((b, cin, 2 * hw, 2 * hw), w.double(), nchw(dy),
                                          stride=2, padding=1))
    ey = torch.randn(b, 2 * hw, 2 * hw, cin, device=DEV)
    if through is None:
        prod = (ey, vec(cin, 0.5, 1.5), vec(cin), vec(cin), vec(cin, 0.5, 1.5),
                ACTIVATIONS["relu"], 0.0)
        kw = dict(stats=2, prod=prod)
    else:
        kw = dict(grad_act=(ey, ACTIVATIONS[through], SLOPE))
        ref = ref * torch.where(ey.double() > 0, 1.0, SLOPE if through == "leaky_relu" else 0.0)
    fn = lambda: ig.conv_gemm(g if bwd is None else None, wk, geom, cin, w_t=True,  # noqa: E731
                              bwd=bwd, **kw)
    return fn, ref


FORWARD = [  # (batch, cin, cout, hw, BN-apply + ReLU prologue, batch groups)
    (2, 16, 32, 4, False, 1),    # G's second layer's 4x4 -> 8x8
    (3, 32, 16, 8, True, 1),     # odd batch, through the producer's BN + ReLU
    (1, 16, 24, 16, False, 1),   # 16-pixel rows; Cout 24: a masked column tile
    (4, 16, 16, 8, True, 2),     # D's grouped pass layout: two groups with their own BN vectors
    (2, 16, 8, 32, False, 1),    # 2048 rows: the interpreter's 512-row tiles, 16 image rows each
]
DGRAD = [  # (batch, conv cin, conv cout, dy hw, dy feed, producer activation or its BN sums)
    (2, 16, 32, 4, "raw", None),
    (3, 32, 16, 8, "bn", None),
    (2, 16, 64, 16, "raw", "leaky_relu"),   # D's first layer's producer: no BN
    (1, 48, 16, 8, "bn", "relu"),
]


@pytest.mark.parametrize("case", FORWARD, ids=lambda c: "b{}_{}to{}_{}x{}{}_g{}".format(
    c[0], c[1], c[2], c[3], c[3], "_bnrelu" if c[4] else "", c[5]))
def test_forward(case, monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    fn, ref = forward_case(*case)
    (y, a, partials), paired = run(monkeypatch, True, fn)
    (y0, a0, partials0), unpaired = run(monkeypatch, False, fn)
    assert paired and not unpaired
    same(y, ref)
    same(a, a0)
    for got, want in zip(partials, partials0):   # per-tile (mean, M2, count)
        same(got, want)


@pytest.mark.parametrize("case", DGRAD, ids=lambda c: "b{}_{}to{}_{}x{}_{}_{}".format(
    c[0], c[1], c[2], c[3], c[3], c[4], c[5] or "bnsums"))
def test_data_gradient(case, monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    fn, ref = dgrad_case(*case)
    (y, _, partials), paired = run(monkeypatch, True, fn)
    (y0, _, partials0), unpaired = run(monkeypatch, False, fn)
    assert paired and not unpaired
    same(y, ref)
    if partials is not None:   # sum(dz), sum(dz * xhat) per tile
        for got, want in zip(partials, partials0):
            same(got, want)


@pytest.mark.parametrize("case, why", [
    (("forward", 2, 16, 16, 3), "3-pixel rows: a row tile is never whole image rows"),
    (("forward", 2, 16, 16, 6), "6-pixel rows"),
    (("forward", 2, 24, 16, 4), "Cin 24: K blocks straddle the row taps"),
    (("dgrad", 2, 16, 128, 4), "a data gradient wider than PAIR_DGRAD_MAX_COUT"),
])
def test_shapes_that_keep_one_tap_per_k_step(case, why, monkeypatch):
    kind, b, cin, cout, hw = case
    if kind == "forward":
        fn, ref = forward_case(b, cin, cout, hw, False, 1)
    else:   # the dgrad's GEMM output channels are the conv's cin
        fn, ref = dgrad_case(b, cout, cin, hw, "raw", None)
    (y, *_), paired = run(monkeypatch, True, fn)
    assert not paired, why
    assert rel_err(y, ref) < 1e-3
