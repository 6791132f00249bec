"""benches/gemm_traffic.py (the operand bytes a GEMM launch loads, behind gemm_model.py's operand
bound and tune_gemm.py's "operand TB/s") against a count by hand, on launches at GPU tiles."""
import inspect
import math
import os
import sys

import torch

from fastdcgan.kernels import implicit_gemm as ig
from fastdcgan.kernels.weights import kernel_weights
from precision import interpreter_only

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benches"))
import gemm_traffic  # noqa: E402
import tune_gemm  # noqa: E402


@interpreter_only
def test_operand_bytes_of_a_forward_gemm_and_a_weight_gradient(monkeypatch):
    monkeypatch.setattr(ig, "INTERPRET", False)
    monkeypatch.setattr(ig, "_num_sms", lambda device: 132)
    nb, cin, cout = 2, 64, 128   # D's second layer: 32x32 -> 16x16, K = 16 taps x 64
    x = torch.randn(nb, 32, 32, cin)
    w = kernel_weights([torch.randn(cout, cin, 4, 4)], [False], torch.float32)[0]
    geom = ig.make_geom(False, 2, 1, 32, 32, 16, 16)
    rows = nb * 16 * 16
    bm, bk, _, cands = ig.gemm_tiles(rows, 256, cin, cout, torch.float32)
    bn = cands[0][0]
    programs = math.ceil(rows / bm) * math.ceil(cout / bn)
    monkeypatch.setenv("FASTDCGAN_TAP_PAIRS", "0")
    got = tune_gemm._run_measuring_operands(lambda: ig.conv_gemm(x, w, geom, cout, stats=1))
    # every row tile reads its [bm, bk] input tile and the [bk, bn] weight tile per K step
    assert got == programs * (16 * cin // bk) * (bm * bk + bk * bn) * 4
    monkeypatch.setenv("FASTDCGAN_TAP_PAIRS", "1")
    got = tune_gemm._run_measuring_operands(lambda: ig.conv_gemm(x, w, geom, cout, stats=1))
    # paired column taps: one input tile per pair of taps, with both taps' weight tiles
    assert got == programs * (8 * cin // bk) * (bm * bk + 2 * bk * bn) * 4
    dy = torch.randn(nb, 16, 16, cout)
    got = tune_gemm._run_measuring_operands(lambda: ig.conv_wgrad(x, None, dy, geom))
    wbk, _, wbn, _ = ig.wgrad_tiles(rows, 16, cin, cout, torch.float32)
    # every weight tile streams all the pixels' input and dy columns once, whatever the split
    assert got == (16 * cin // wbk) * math.ceil(cout / wbn) * rows * (wbk + wbn) * 4


@interpreter_only
def test_bytes_of_the_input_stationary_transposed_conv(monkeypatch):
    """G's last layer reads its input once (plus the weight per row tile) and moves its fp32
    contributions P through memory: stored by tap_gemm_kernel, read back by tap_sum_kernel."""
    monkeypatch.setattr(ig, "INTERPRET", False)
    nb, cin, cout, hw = 2, 64, 3, 32
    launches = {}

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kw):
                values = dict(zip(inspect.signature(self.kernel.fn).parameters, args))
                launches[self.kernel.fn.__name__] = (kw, math.prod(grid), values)
                return self.kernel[grid](*args, **kw)
            return run

    monkeypatch.setattr(ig, "tap_gemm_kernel", Spy(ig.tap_gemm_kernel))
    monkeypatch.setattr(ig, "tap_sum_kernel", Spy(ig.tap_sum_kernel))
    x = torch.randn(nb, hw, hw, cin)
    w = kernel_weights([torch.randn(cin, cout, 4, 4)], [True], torch.float32)[0]
    geom = ig.make_geom(True, 2, 1, hw, hw, 2 * hw, 2 * hw)
    ig.conv_gemm(x, w, geom, cout, epi=ig.Xform(None, None, 3, 0.0), store_a=True)
    pixels = nb * hw * hw
    consts, programs, values = launches["tap_gemm_kernel"]
    bm, bn, bk = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"]
    assert programs == pixels // bm and bn == 64 and cin % bk == 0
    # the input once, the weight once per row tile (over its cin // bk K steps), P stored
    want = pixels * cin * 4 + programs * cin * bn * 4 + pixels * 16 * cout * 4
    assert gemm_traffic.operand_bytes("tap_gemm_kernel", consts, programs, values, 4) == want
    consts, programs, values = launches["tap_sum_kernel"]
    # every output reads its 4 fp32 contributions and stores y and tanh(y)
    want = 4 * pixels * cout * (4 * 4 + 2 * 4)
    assert gemm_traffic.operand_bytes("tap_sum_kernel", consts, programs, values, 4) == want


@interpreter_only
def test_paired_column_taps_read_a_transposed_convs_input_8_times(monkeypatch):
    """A stride-2 transposed conv's phase GEMMs with paired column taps: each phase reads the
    input once per row tap (8 times in all, not 16) and both taps' weight tiles per K step."""
    monkeypatch.setenv("FASTDCGAN_TAP_PAIRS", "1")
    monkeypatch.setattr(ig, "INTERPRET", False)
    monkeypatch.setattr(ig, "_num_sms", lambda device: 132)
    seen = []
    launch_one = ig._launch_one
    monkeypatch.setattr(ig, "_launch_one", lambda kernel, grid, args, consts, cfg: (
        seen.append({**consts, **cfg.kwargs}), launch_one(kernel, grid, args, consts, cfg))[1])
    nb, cin, cout, hw = 2, 64, 64, 8   # G's third layer's shape at a narrow width: 8x8 -> 16x16
    x = torch.randn(nb, hw, hw, cin)
    w = kernel_weights([torch.randn(cin, cout, 4, 4)], [True], torch.float32)[0]
    geom = ig.make_geom(True, 2, 1, hw, hw, 2 * hw, 2 * hw)
    got = tune_gemm._run_measuring_operands(lambda: ig.conv_gemm(x, w, geom, cout, stats=1))
    consts = seen[-1]
    bm, bn, bk = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"]
    assert consts["PAIR"] and bm == nb * hw * hw and bn == cout
    programs, steps = 4, 2 * cin // bk   # one row tile per phase; K: 2 row taps x cin
    assert got == programs * steps * (bm * bk + 2 * bk * bn) * 4
    weight_bytes = programs * steps * 2 * bk * bn * 4
    assert got - weight_bytes == 8 * x.numel() * 4
