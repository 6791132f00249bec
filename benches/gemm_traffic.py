"""Operand traffic of the implicit-GEMM launches: the bytes their programs load as operand tiles.

Every program reads its A and B tiles once per main-loop iteration from L2 (cp.async.cg: L1 is
bypassed), so an implicit GEMM re-reads a stride-2 conv's input 4 times and a transposed conv's
16 times (4 taps x 4 phases), or half that with paired column taps (two taps per A tile), and the
weight once per row tile. The input-stationary transposed conv with few output channels reads its
input once but moves its contributions P (fp32, or the operands' dtype in inference) through
memory: tap_gemm_kernel's bytes count P's store, tap_sum_kernel's (not a GEMM) P's reads.
benches/gemm_model.py bounds a launch's time by these bytes at a given rate; benches/tune_gemm.py
reports the rate each tuned tile achieves.
"""
import math


def iterations(name, consts, values):
    """Main-loop iterations per program: K steps (conv_gemm: one per pair of column taps when
    they are paired), pixel steps (weight gradients)."""
    if name == "conv_gemm_kernel":
        taps = consts["T"] ** 2 // (2 if consts.get("PAIR") else 1)
        return math.ceil(taps * consts["CIN"] / consts["BLOCK_K"])
    if name == "tap_gemm_kernel":
        return math.ceil(consts["CIN"] / consts["BLOCK_K"])
    return math.ceil(values["M_SPLIT"] / consts["BLOCK_M"])


def mma_columns(consts):
    """Accumulator columns of a GEMM program: BLOCK_N, twice that with paired column taps (two
    [BLOCK_K, BLOCK_N] weight tiles per K step, one per tap)."""
    return consts["BLOCK_N"] * (2 if consts.get("PAIR") else 1)


def operand_bytes(name, consts, programs, values, elem_bytes):
    """Bytes a GEMM launch loads as operand tiles: every program reads its [BLOCK_M, BLOCK_K] and
    [BLOCK_K, BLOCK_N] tiles (weight gradients: [BLOCK_M pixels, BLOCK_K] and [BLOCK_M pixels,
    BLOCK_N]) once per iteration; a BN-backward prologue reads two tensors (g and y) for one."""
    if name == "tap_sum_kernel":   # 4 contributions per output, the outputs and EPI_GRAD's y
        outputs = consts["STORE_Y"] + consts["STORE_A"] + consts["EPI_GRAD"]
        return values["NPIX"] * consts["COUT"] * (4 * _p_bytes(values) + outputs * elem_bytes)
    bm, bn, bk = consts["BLOCK_M"], mma_columns(consts), consts["BLOCK_K"]
    if name in ("conv_gemm_kernel", "tap_gemm_kernel"):
        per_step = bm * bk * (2 if consts["PRO"] == 2 else 1) + bk * bn
    else:
        per_step = bm * bk + bm * bn * (2 if consts["OUT_MODE"] == 2 else 1)
    tiles = programs * iterations(name, consts, values) * per_step * elem_bytes
    if name == "tap_gemm_kernel":
        return tiles + values["M"] * 16 * consts["COUT"] * _p_bytes(values)   # P's store
    return tiles


def _p_bytes(values):
    """Bytes per element of the input-stationary contributions P (the launch's p_ptr)."""
    return values["p_ptr"].element_size()
