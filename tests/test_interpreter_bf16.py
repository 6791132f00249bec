"""kernels/interpreter.py: under the Triton interpreter a bf16 tl.dot gives what a GPU's MMA
gives (exact products, fp32 sums) and an fp32 -> bf16 cast rounds to nearest even as a GPU's
does, so the CPU tests can run the kernels in bf16."""
import torch
import triton
import triton.language as tl

import fastdcgan.kernels  # noqa: F401  (the package applies the fixes under the interpreter)
from precision import interpreter_only

pytestmark = interpreter_only


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = tl.full([M, N], 0.5, tl.float32)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, acc))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(y_ptr + r, (tl.load(x_ptr + r) * 3.0).to(tl.bfloat16))


def test_bf16_dot_is_exact_products_summed_in_fp32():
    torch.manual_seed(0)
    a = torch.randn(32, 64).to(torch.bfloat16)
    b = torch.randn(64, 16).to(torch.bfloat16)
    c = torch.empty(32, 16)
    _dot_kernel[(1,)](a, b, c, M=32, N=16, K=64)
    want = a.double() @ b.double() + 0.5
    assert (c.double() - want).abs().max().item() < 1e-4


def test_fp32_to_bf16_rounds_to_nearest_even():
    torch.manual_seed(0)
    special = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e38, 1e-40, -1e-40,
               1.00390625 / 3, 1.01171875 / 3]   # x3: a tie to even down and one up
    x = torch.cat([torch.randn(4096 - len(special)), torch.tensor(special)])
    y = torch.empty(4096, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, N=4096)
    want = (x * 3.0).bfloat16()
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y[~want.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))
