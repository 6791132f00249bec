"""FASTDCGAN_TMA=1: the forward and data-gradient GEMMs on raw operands load their tiles as TMA
boxes (implicit_gemm._tma_taps: stride-1 inputs as [images, rows, cols, channels] boxes, stride-2
ones through a [N, H/2, 2, W/2, 2C] view), against float64 PyTorch, with the fallback to the
pointer loads where the boxes cannot hold a tile.

CPU (Triton interpreter, whose descriptor loads zero-fill out-of-bounds boxes as TMA does): the
block ops at tiny shapes, fp32 (exact dots) and bf16, a whole G -> D training pass and chains run
on batch groups. CUDA: the whole networks at full width in TF32 and bf16.
"""
import pytest
import torch
from torch import nn

from fastdcgan import ops
from fastdcgan.kernels import implicit_gemm as ig, pdl
from precision import GPU_TOL, check_block, interpreter_only, make_block, needs_cuda, DEV
from test_batch_groups import check_grouped_pass
from test_models_triton import train_step_check

pytestmark = pytest.mark.usefixtures("poison")


@pytest.fixture
def tma_launches(monkeypatch):
    """Turns TMA on and records, per GEMM launch that could take it, whether it did."""
    monkeypatch.setenv("FASTDCGAN_TMA", "1")
    taken = []
    descriptors = ig._tma_descriptors

    def record(*args, **kw):
        d = descriptors(*args, **kw)
        taken.append(d is not None)
        return d

    monkeypatch.setattr(ig, "_tma_descriptors", record)
    return taken


CONV, CONVT = (nn.Conv2d, ops.conv_bn_act), (nn.ConvTranspose2d, ops.conv_transpose_bn_act)
# (module, batch, cin, cout, hw, stride, padding, activation): BN blocks whose forward and data
# gradient both take boxes
BOXED = [
    (CONV, 2, 16, 32, 16, 2, 1, "leaky_relu"),    # stride 2 (row pairs), 8x8 out: 4 rows a tile
    (CONV, 3, 32, 16, 8, 2, 1, "relu"),           # 4x4 out: 2 images a tile, the last one past N
    (CONVT, 3, 16, 16, 4, 2, 1, "relu"),          # 4 phases of 4x4, dgrad a stride-2 conv 8->4
    (CONVT, 2, 16, 16, 16, 2, 1, "none"),         # 2048 rows: the interpreter's 512-row tiles
    (CONV, 6, 16, 16, 4, 1, 0, "leaky_relu"),     # 4x4 -> 1x1: dgrad of 16 phases from 1x1 maps
]


def case_id(c):
    return "{}_b{}_{}to{}_{}x{}_s{}".format("conv" if c[0] is CONV else "convT", *c[1:5], c[4], c[5])


@interpreter_only
@pytest.mark.parametrize("case", BOXED, ids=case_id)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, GPU_TOL["bf16"])],
                         ids=["fp32", "bf16"])
def test_block_with_boxed_operands(case, dtype, tol, tma_launches, monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    (cls, op), b, cin, cout, hw, stride, pad, act = case
    ref, x = make_block(cls, b, cin, cout, hw, stride, pad, True, act, dtype=dtype, device=DEV)
    check_block(op, ref, x, dtype, True, tol, stride=stride, padding=pad, activation=act)
    assert tma_launches == [True, True]   # forward, data gradient


@interpreter_only
@pytest.mark.parametrize("case, taken", [
    # 7x7 -> 3x3: the forward's rows of 3 pixels take pointers; the data gradient's phases
    # (4x4 maps of the 7x7 output, the pixels past it masked) are boxed
    ((CONV, 3, 16, 16, 7, 2, 1, "tanh"), [False, True]),
    ((CONV, 3, 24, 16, 8, 2, 1, "relu"), [True]),   # Cin 24, a flat K block: only the data
                                                    # gradient (K = 16) asks, and is boxed
], ids=["odd_map", "flat_k"])
def test_shapes_the_boxes_cannot_hold_fall_back(case, taken, tma_launches, monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    (cls, op), b, cin, cout, hw, stride, pad, act = case
    ref, x = make_block(cls, b, cin, cout, hw, stride, pad, True, act, device=DEV)
    check_block(op, ref, x, torch.float32, True, 2e-5, stride=stride, padding=pad, activation=act)
    assert tma_launches == taken


@interpreter_only
def test_misaligned_weight_falls_back(tma_launches):
    """TMA needs 16-byte aligned rows: a bf16 weight view 2 bytes into its storage (read in
    place: fp32 forwards read a K-major copy) takes the pointer loads, with the same result."""
    x = torch.randn(2, 8, 8, 16, device=DEV).to(torch.bfloat16)
    w = torch.randn(4 * 4 * 16 * 32 + 1, device=DEV).to(torch.bfloat16)[1:].view(4, 4, 16, 32)
    geom = ig.make_geom(False, 2, 1, 8, 8, 4, 4)
    y, _, _ = ig.conv_gemm(x, w, geom, 32)
    want = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).double(),
                                      w.permute(3, 2, 0, 1).double(), stride=2, padding=1)
    assert tma_launches == [False]
    assert (y.permute(0, 3, 1, 2).double() - want).norm() / want.norm() < 1e-2


@interpreter_only
def test_training_pass_with_boxed_operands(tma_launches, monkeypatch):
    """G -> D forward and backward against float64 PyTorch. At widths 8, 9 GEMMs are boxed: the
    forwards of G's 3 middle layers and D's last 2 strided ones, and the data gradients of those
    of D and G with K and output channels >= 16 (the rest: flat K, GEMV, input-stationary)."""
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    train_step_check(nz=8, ngf=8, ndf=8, batch=2, dtype=torch.float32, tol=5e-5)
    assert sum(tma_launches) == 9


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 3e-2), (torch.bfloat16, 1e-1)], ids=["tf32", "bf16"])
def test_full_size_with_boxed_operands_gpu(dtype, tol, tma_launches):
    train_step_check(nz=100, ngf=64, ndf=64, batch=32, dtype=dtype, tol=tol)
    assert sum(tma_launches) >= 9


@interpreter_only
@pytest.mark.parametrize("kind, groups", [("conv", 2), ("transposed", 3)])
def test_grouped_pass_with_boxed_operands(kind, groups, tma_launches, monkeypatch):
    """Batch groups (D's pass over real and fake): row tiles shrunk to a group's rows, boxed.
    Width 16: channels 32 and 48, whole K blocks."""
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    check_grouped_pass(kind, groups, width=16)
    assert sum(tma_launches) >= 2


def test_boxes_need_hopper(monkeypatch):
    """TMA is sm_90+: on an older GPU (or the CPU outside the interpreter) FASTDCGAN_TMA=1 keeps
    the pointer loads."""
    monkeypatch.setattr(ig, "INTERPRET", False)
    monkeypatch.setattr(pdl, "_capability", lambda index: 8)   # an A100
    assert not ig.has_tma(torch.device("cuda:0"))
    monkeypatch.setattr(pdl, "_capability", lambda index: 9)
    assert ig.has_tma(torch.device("cuda:0"))
    assert not ig.has_tma(torch.device("cpu"))
