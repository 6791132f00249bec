"""Activation helpers shared by every fused kernel: the forward activation applied where a value is
produced or consumed, and its derivative recomputed from the pre-activation z in the backward.

Activations are compile-time codes (tl.constexpr), so each kernel specializes on the one it uses.
All math is fp32.
"""
import triton
import triton.language as tl

ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}


def act_code(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@triton.jit
def _tanh(z):
    # tanh through exp (portable: the interpreter and every GPU backend have exp); saturates
    # cleanly: exp overflow to inf gives exactly +-1.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def apply_act(z, ACT: tl.constexpr, slope):
    """act(z) for the activation code ACT (slope is LeakyReLU's negative_slope)."""
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        z = _tanh(z)
    elif ACT == 4:
        z = _sigmoid(z)
    return z


@triton.jit
def act_grad(z, ACT: tl.constexpr, slope):
    """d act / dz at the pre-activation z, with PyTorch's convention at the kink (z > 0 -> 1)."""
    if ACT == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where(z > 0, 1.0, slope)
    elif ACT == 3:
        t = _tanh(z)
        d = 1.0 - t * t
    elif ACT == 4:
        s = _sigmoid(z)
        d = s * (1.0 - s)
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d
