"""The input-stationary stride-2 transposed conv with few output channels (conv_gemm's
tap_gemm_kernel + tap_sum_kernel: G's last layer, and the data gradient of D's first layer)
against float64 PyTorch, for every operand prologue and epilogue it takes, odd sizes included.

CPU (Triton interpreter): fp32 with exact dots, and bf16. The GPU tiles of the same kernels run in
test_gpu_tiles.py, the whole G and D in test_models_triton.py.
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


def act(z, name):
    return {"none": lambda: z, "relu": lambda: z.clamp_min(0),
            "leaky_relu": lambda: F.leaky_relu(z, SLOPE), "tanh": lambda: torch.tanh(z),
            "sigmoid": lambda: torch.sigmoid(z)}[name]()


def act_grad(z, name):
    return {"none": lambda: torch.ones_like(z), "relu": lambda: (z > 0).to(z.dtype),
            "leaky_relu": lambda: torch.where(z > 0, 1.0, SLOPE).to(z.dtype),
            "tanh": lambda: 1 - torch.tanh(z) ** 2,
            "sigmoid": lambda: torch.sigmoid(z) * (1 - torch.sigmoid(z))}[name]()


class Launches:
    """Records which GEMM kernels conv_gemm launches."""

    def __init__(self, monkeypatch):
        self.names = []
        launch = ig.launch
        tap_gemm = ig.tap_gemm_kernel

        def record_launch(kernel, *args, **kw):
            self.names.append(kernel.fn.__name__)
            return launch(kernel, *args, **kw)

        class RecordTapGemm:
            def __getitem__(_, grid):
                self.names.append("tap_gemm_kernel")
                return tap_gemm[grid]

        monkeypatch.setattr(ig, "launch", record_launch)
        monkeypatch.setattr(ig, "tap_gemm_kernel", RecordTapGemm())


def forward_case(b, cin, cout, hw, pro_act, epi, dtype):
    """A random transposed-conv forward (stride 2, padding 1) in `dtype` through conv_gemm and its
    float64 reference. epi: "tanh" (G's last layer: raw y and tanh(y) stored) or "bn_leaky" (a
    folded BN + LeakyReLU epilogue, only the activation stored)."""
    x = torch.randn(b, hw, hw, cin, device=DEV).to(dtype)
    w = (torch.randn(cin, cout, 4, 4, device=DEV) * 0.1).to(dtype)
    wk = kernel_view(w, True).contiguous()
    oh = ig.conv_out_size(True, 2, 1, hw)
    geom = ig.make_geom(True, 2, 1, hw, hw, oh, oh)
    pro = None
    z = x.double()
    if pro_act is not None:
        pro = ig.Xform(vec(cin, 0.5, 1.5), vec(cin), ACTIVATIONS[pro_act], SLOPE)
        z = act(z * pro.scale.double() + pro.shift.double(), pro_act)
    ref_y = nhwc(F.conv_transpose2d(nchw(z), w.double(), stride=2, padding=1))
    if epi == "tanh":
        xf = ig.Xform(None, None, ACTIVATIONS["tanh"], 0.0)
        y, a, partials = ig.conv_gemm(x, wk, geom, cout, pro=pro, epi=xf, store_a=True)
        want = [(y, ref_y), (a, torch.tanh(ref_y))]
    else:
        xf = ig.Xform(vec(cout, 0.5, 1.5), vec(cout), ACTIVATIONS["leaky_relu"], SLOPE)
        y, a, partials = ig.conv_gemm(x, wk, geom, cout, pro=pro, epi=xf, store_y=False,
                                      store_a=True)
        assert y is None
        want = [(a, act(ref_y * xf.scale.double() + xf.shift.double(), "leaky_relu"))]
    assert partials is None
    return want


def dgrad_case(b, cin_fwd, cout_fwd, hw, bwd_kind, through, dtype):
    """The data gradient of a random conv (stride 2, padding 1, cin_fwd input channels, an hw x hw
    input) in `dtype` through conv_gemm and its float64 reference. bwd_kind: dy read raw ("raw"),
    as g*act'(y) ("act") or through the BN backward A*g*act'(y*s + b) + B*y + C ("bn").
    through: the producer's activation the gradient is carried through (EPI_GRAD), or None."""
    w = (torch.randn(cout_fwd, cin_fwd, 4, 4, device=DEV) * 0.1).to(dtype)
    wk = kernel_view(w, False).contiguous()
    oh = ig.conv_out_size(False, 2, 1, hw)
    geom = ig.make_geom(True, 2, 1, oh, oh, hw, hw)   # the dgrad runs the conv backwards
    g = torch.randn(b, oh, oh, cout_fwd, device=DEV).to(dtype)
    yb = torch.randn(b, oh, oh, cout_fwd, device=DEV).to(dtype)
    gd, yd = g.double(), yb.double()
    if bwd_kind == "raw":
        bwd, dy = None, gd
    elif bwd_kind == "act":
        bwd = ig.BwdOperand(g, yb, None, None, None, None, None, ACTIVATIONS["leaky_relu"], SLOPE)
        dy = gd * act_grad(yd, "leaky_relu")
    else:
        s, sh, ca, cb, cc = (vec(cout_fwd, 0.5, 1.5), vec(cout_fwd), vec(cout_fwd, 0.5, 1.5),
                             vec(cout_fwd), vec(cout_fwd))
        bwd = ig.BwdOperand(g, yb, s, sh, ca, cb, cc, ACTIVATIONS["relu"], 0.0)
        dy = (ca.double() * gd * act_grad(yd * s.double() + sh.double(), "relu")
              + cb.double() * yd + cc.double())
    ref = nhwc(torch.nn.grad.conv2d_input((b, cin_fwd, hw, hw), w.double(), nchw(dy), stride=2,
                                          padding=1))
    grad_act = None
    if through is not None:
        ey = torch.randn(b, hw, hw, cin_fwd, device=DEV).to(dtype)
        grad_act = (ey, ACTIVATIONS[through], SLOPE)
        ref = ref * act_grad(ey.double(), through)
    y, a, partials = ig.conv_gemm(g if bwd is None else None, wk, geom, cin_fwd, w_t=True, bwd=bwd,
                                  grad_act=grad_act)
    assert a is None and partials is None
    return [(y, ref)]


def check_input_stationary(run_case, case, dtype, monkeypatch):
    """run_case(*case, dtype)'s outputs match their float64 references (exact fp32 dot; bf16:
    within 1e-2, where rounding the stored outputs and the prologue's operands gives ~3e-3, and
    the bf16 contributions P of an inference pass ("bn_leaky": no raw output kept) 3.3e-3
    against 2.6e-3 with fp32 P), and conv_gemm ran them input-stationary."""
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    launches = Launches(monkeypatch)
    for got, want in run_case(*case, dtype):
        assert got.shape == want.shape and got.dtype == dtype
        assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert launches.names == ["tap_gemm_kernel"]


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


FORWARD = [  # (batch, cin, cout, hw, producer activation applied in the prologue, epilogue)
    (2, 8, 3, 8, None, "tanh"),            # G's last layer, activation materialized
    (2, 8, 3, 8, "relu", "tanh"),          # ... through its producer's BN + ReLU
    (3, 24, 1, 3, "leaky_relu", "bn_leaky"),   # odd map, K of 1.5 blocks, Cout 1
    (1, 5, 8, 5, None, "bn_leaky"),        # Cin 5 (a masked K block), Cout 8: 128 columns
    (2, 16, 2, 16, "relu", "tanh"),        # 1024 input pixels: the interpreter's larger tiles
]
DGRAD = [  # (batch, conv cin, conv cout, conv input hw, dy feed, producer activation)
    (2, 3, 8, 8, "raw", "tanh"),           # D's first layer on G's output: through G's tanh
    (2, 3, 16, 7, "act", None),            # odd input 7x7 <- 3x3 (its last row from one tap)
    (3, 5, 12, 6, "bn", "leaky_relu"),
    (1, 8, 20, 9, "raw", None),
]


@pytest.mark.parametrize("case", FORWARD, ids=lambda c: "b{}_{}to{}_{}x{}_{}_{}".format(
    c[0], c[1], c[2], c[3], c[3], c[4] or "raw", c[5]))
@DTYPES
def test_forward(case, dtype, monkeypatch):
    check_input_stationary(forward_case, case, dtype, monkeypatch)


@pytest.mark.parametrize("case", DGRAD, ids=lambda c: "b{}_{}to{}_{}x{}_{}_{}".format(
    c[0], c[1], c[2], c[3], c[3], c[4], c[5] or "none"))
@DTYPES
def test_data_gradient(case, dtype, monkeypatch):
    check_input_stationary(dgrad_case, case, dtype, monkeypatch)


def test_batchnorm_statistics_take_the_phase_gemms(monkeypatch):
    """BN statistics come from conv_gemm_kernel's epilogue, so a few-channel transposed conv with
    BatchNorm (and one with more than 8 output channels) runs as phase GEMMs."""
    launches = Launches(monkeypatch)
    x = torch.randn(2, 4, 4, 8, device=DEV)
    geom = ig.make_geom(True, 2, 1, 4, 4, 8, 8)
    ig.conv_gemm(x, torch.randn(4, 4, 8, 3, device=DEV), geom, 3, stats=1)
    ig.conv_gemm(x, torch.randn(4, 4, 8, 9, device=DEV), geom, 9)
    assert launches.names == ["conv_gemm_kernel", "conv_gemm_kernel"]


@pytest.mark.parametrize("store_y, p_dtype", [(False, torch.bfloat16), (True, torch.float32)],
                         ids=["inference", "before_backward"])
def test_contributions_are_bf16_in_inference_only(store_y, p_dtype, monkeypatch):
    """bf16 operands: P takes their dtype when no raw output is kept for a backward (half the
    layer's traffic), else fp32, so that the outputs a backward's ReLU' reads round once."""
    allocated = []
    new_empty = ig.new_empty

    def record(shape, device, dtype=torch.float32):
        allocated.append((tuple(shape), dtype))
        return new_empty(shape, device, dtype)

    monkeypatch.setattr(ig, "new_empty", record)
    x = torch.randn(2, 4, 4, 16, device=DEV).to(torch.bfloat16)
    w = torch.randn(4, 4, 16, 3, device=DEV).to(torch.bfloat16)
    geom = ig.make_geom(True, 2, 1, 4, 4, 8, 8)
    ig.conv_gemm(x, w, geom, 3, epi=ig.Xform(None, None, ACTIVATIONS["tanh"], 0.0),
                 store_y=store_y, store_a=True)
    assert ((2 * 4 * 4, 16 * 3), p_dtype) in allocated
