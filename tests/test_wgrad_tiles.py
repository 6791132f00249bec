"""The weight gradient (conv_wgrad_kernel) at the K tiles bf16 takes on a GPU: 256 weight rows with
raw operands, i.e. 4 taps of Cin 64, 2 of Cin 128 or one tap of Cin 256 per tile, run in bf16 with
the GPU's tile choice (the interpreter's own tiles are smaller) against float64 PyTorch. bf16
products are exact and summed in fp32, so the weight gradient of bf16 operands is fp32-accurate."""
import pytest
import torch

from fastdcgan.kernels import implicit_gemm as ig
from fastdcgan.kernels.weights import torch_view
from precision import DEV, interpreter_only, rel_err

pytestmark = [pytest.mark.usefixtures("poison"), interpreter_only]


def test_bf16_raw_operands_take_256_row_k_tiles(monkeypatch):
    monkeypatch.setattr(ig, "INTERPRET", False)
    for cin, aligned in ((64, False), (128, False), (256, True), (512, True)):
        bk, al, _, cands = ig.wgrad_tiles(1 << 16, 16, cin, 256, torch.bfloat16, raw=True)
        assert (bk, al) == (256, aligned) and cands[0][2] == 3   # 3 stages fit 147 KB
    # through prologues (two operand transforms in the loop) and in fp32: 128 / 64 rows
    assert ig.wgrad_tiles(1 << 16, 16, 128, 256, torch.bfloat16)[0] == 128
    assert ig.wgrad_tiles(1 << 16, 16, 128, 256, torch.float32, raw=True)[0] == 64


@pytest.mark.parametrize("cin, cout, hw, transposed", [
    (64, 32, 8, False),    # flat K: each tile spans 4 taps
    (128, 16, 4, False),   # 2 taps a tile
    (256, 16, 4, False),   # one tap, aligned
    (64, 48, 4, True),     # a transposed conv's phases, 4 taps of 2x2 per tile
])
def test_256_row_k_tiles(cin, cout, hw, transposed, monkeypatch):
    monkeypatch.setattr(ig, "INTERPRET", False)   # an H100's tiles, not the interpreter's
    monkeypatch.setattr(ig, "_num_sms", lambda device: 132)
    monkeypatch.setattr(ig, "_TILE_TABLE", {})    # the heuristic's tile, not a measured entry's
    monkeypatch.setattr(ig, "_BUCKETS", {})
    seen = []
    launch = ig.launch
    monkeypatch.setattr(ig, "launch", lambda kernel, grid, args, consts, *a, **kw: (
        seen.append(consts["BLOCK_K"]), launch(kernel, grid, args, consts, *a, **kw))[1])
    b = 3
    oh = ig.conv_out_size(transposed, 2, 1, hw)
    geom = ig.make_geom(transposed, 2, 1, hw, hw, oh, oh)
    x = torch.randn(b, hw, hw, cin, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn(b, oh, oh, cout, device=DEV, dtype=torch.bfloat16)
    dw = ig.conv_wgrad(x, None, dy, geom)
    xd, dyd = x.permute(0, 3, 1, 2).double(), dy.permute(0, 3, 1, 2).double()
    if transposed:   # conv_transpose2d(x, W) is conv2d's input gradient: swap x and dy
        ref = torch.nn.grad.conv2d_weight(dyd, (cin, cout, 4, 4), xd, stride=2, padding=1)
    else:
        ref = torch.nn.grad.conv2d_weight(xd, (cout, cin, 4, 4), dyd, stride=2, padding=1)
    assert seen == [256]
    got = torch_view(dw, transposed)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-5
