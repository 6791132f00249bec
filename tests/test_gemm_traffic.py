"""benches/gemm_traffic.py (the operand bytes a GEMM launch loads, behind gemm_model.py's operand
bound and tune_gemm.py's "operand TB/s") against a count by hand, on launches at GPU tiles."""
import math
import os
import sys

import torch

from fastdcgan.kernels import implicit_gemm as ig
from fastdcgan.kernels.weights import kernel_weights
from precision import interpreter_only

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benches"))
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
    got = tune_gemm._run_measuring_operands(lambda: ig.conv_gemm(x, w, geom, cout, stats=1))
    # every row tile reads its [bm, bk] input tile and the [bk, bn] weight tile per K step
    programs = math.ceil(rows / bm) * math.ceil(cout / bn)
    assert got == programs * (16 * cin // bk) * (bm * bk + bk * bn) * 4
    dy = torch.randn(nb, 16, 16, cout)
    got = tune_gemm._run_measuring_operands(lambda: ig.conv_wgrad(x, None, dy, geom))
    wbk, _, wbn, _ = ig.wgrad_tiles(rows, 16, cin, cout, torch.float32)
    # every weight tile streams all the pixels' input and dy columns once, whatever the split
    assert got == (16 * cin // wbk) * math.ceil(cout / wbn) * rows * (wbk + wbn) * 4
