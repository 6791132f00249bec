"""Fix-ups of the Triton interpreter (TRITON_INTERPRET=1) so that bf16 kernels compute what a GPU
computes. The interpreter holds bf16 tensors as their uint16 bit patterns, and two of its
operations get bf16 wrong (as of triton 3.9):

- tl.dot multiplies the bit patterns (triton-lang/triton#11584, not supported upstream): a bf16
  dot comes out ~1e10 off. A GPU's bf16 MMA forms exact products and sums them in fp32, so the
  operands are converted to fp32 before the interpreter's matmul: the GPU's result up to the
  order of the sum.
- fp32 -> bf16 casts (`.to(tl.bfloat16)`) truncate the mantissa, where a GPU rounds to nearest
  even (cvt.rn.bf16.f32): every bf16 store was biased by up to one ulp (measured: half the
  values of a random tensor differ from torch's rounding).

The package (kernels/__init__.py) applies them at import when the interpreter is on.
"""
import numpy as np
import triton.language as tl


def _fp32_to_bf16_rne(x):
    """float32 array -> bf16 bit patterns (uint16), rounded to nearest even like the GPU."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    return np.where(nan, ((bits >> 16) | 0x0040).astype(np.uint16), rounded)


def fix_bf16():
    """Patches the interpreter's tl.dot and fp32 -> bf16 cast (idempotent)."""
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    if getattr(InterpreterBuilder, "fastdcgan_bf16_fixed", False):
        return
    create_dot, cast_impl = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def is_bf16(t):
        return t.dtype.scalar == tl.bfloat16 and t.data.dtype == np.uint16

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (cast_impl(self, t, tl.float32) if is_bf16(t) else t for t in (a, b))
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(_fp32_to_bf16_rne(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = dot, cast
    InterpreterBuilder.fastdcgan_bf16_fixed = True
