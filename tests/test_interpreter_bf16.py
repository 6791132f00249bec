"""kernels/interpreter.py: under the Triton interpreter a bf16 tl.dot gives what a GPU's MMA
gives (exact products, fp32 sums), so the CPU tests can run the kernels in bf16."""
import torch
import triton
import triton.language as tl

from fastdcgan.kernels import implicit_gemm  # noqa: F401  (applies the fix under the interpreter)
from precision import interpreter_only

pytestmark = interpreter_only


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = tl.full([M, N], 0.5, tl.float32)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, acc))


def test_bf16_dot_is_exact_products_summed_in_fp32():
    torch.manual_seed(0)
    a = torch.randn(32, 64).to(torch.bfloat16)
    b = torch.randn(64, 16).to(torch.bfloat16)
    c = torch.empty(32, 16)
    _dot_kernel[(1,)](a, b, c, M=32, N=16, K=64)
    want = a.double() @ b.double() + 0.5
    assert (c.double() - want).abs().max().item() < 1e-4
