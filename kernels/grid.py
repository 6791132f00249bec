"""Host-side launch arithmetic in plain Python: triton.cdiv / triton.next_power_of_2 are Triton
constexpr functions whose Python calls cost ~3 us each, and a block's launches compute a dozen."""


def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def pow2_divisor(n, limit):
    """The largest power of two <= limit dividing n: a row tile that never straddles two BatchNorm
    groups of n rows each (grouped passes, kernels/bn.py)."""
    return min(limit, n & -n)
