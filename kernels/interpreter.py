"""A fix-up of the Triton interpreter (TRITON_INTERPRET=1) so that bf16 GEMMs compute what a GPU
computes.

The interpreter holds bf16 tensors as their uint16 bit patterns, and its tl.dot multiplies those
patterns (triton-lang/triton#11584, not supported upstream as of triton 3.9): a bf16 dot comes out
~1e10 off while bf16 loads, stores and casts are exact. A GPU's bf16 MMA forms exact products and
accumulates them in fp32, so converting bf16 operands to fp32 before the interpreter's matmul
gives the GPU's result up to the order of the sum. implicit_gemm applies it at import when the
interpreter is on."""
import numpy as np
import triton.language as tl


def fix_bf16_dot():
    """Makes the interpreter's tl.dot convert bf16 operands to fp32 first (idempotent)."""
    from triton.runtime.interpreter import InterpreterBuilder

    create_dot = InterpreterBuilder.create_dot
    if getattr(create_dot, "converts_bf16", False):
        return

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(t, tl.float32)
                if t.dtype.scalar == tl.bfloat16 and t.data.dtype == np.uint16 else t for t in (a, b))
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    dot.converts_bf16 = True
    InterpreterBuilder.create_dot = dot
