"""Tile sweep for the implicit-GEMM kernels at the DCGAN layer shapes: the forward GEMM as the
chained network runs it (producer's BN-apply + activation in the prologue, BN statistics in the
epilogue) and the split-K weight gradient, each over a few tile configurations, against cuDNN's
convolution alone (channels_last, same dtype). Prints the time of every config and the best.

    python benches/tune_gemm.py [--batch 512] [--dtype bf16] [--layers G1,G2,G3,D1,D2,D3]
"""
import argparse

import torch
import torch.nn.functional as F
import triton.testing

from fastdcgan.kernels import implicit_gemm as ig
from fastdcgan.kernels.block import _kio
from layer_table import LAYERS

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); None = the shipped heuristic
FWD_CONFIGS = [None, (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 64, 64, 4, 4),
               (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3)]
# (BLOCK_K weight rows, BLOCK_N, BLOCK_M pixels per step, num_warps, num_stages)
WGRAD_CONFIGS = [None, (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                 (128, 128, 32, 8, 4), (64, 64, 128, 4, 3)]


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40)


def _case(layer, batch, dtype):
    _, transposed, cin, cout, hw, stride, pad, _, _ = layer
    oh = ig.conv_out_size(transposed, stride, pad, hw)
    geom = ig.make_geom(transposed, stride, pad, hw, hw, oh, oh)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, hw, hw, cin, generator=g).to("cuda", dtype)
    w = (torch.randn((cin, cout, 4, 4) if transposed else (cout, cin, 4, 4), generator=g) * 0.02).cuda()
    wp = ig.pack_weight(w, geom, _kio(transposed, False), dtype)
    pro = ig.Xform(torch.rand(cin, device="cuda") + 0.5, torch.randn(cin, device="cuda") * 0.1, 1, 0.0)
    dy = torch.randn(batch, oh, oh, cout, generator=g).to("cuda", dtype)
    bwd = ig.BwdOperand(dy, torch.randn_like(dy), None, None, None, None, None, 0, 0.0)
    xn = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    wc = w.to(dtype).contiguous(memory_format=torch.channels_last)
    conv = F.conv_transpose2d if transposed else F.conv2d
    cudnn = lambda: conv(xn, wc, stride=stride, padding=pad)  # noqa: E731
    return geom, x, wp, pro, bwd, cout, cudnn


def sweep(layer, batch, dtype):
    geom, x, wp, pro, bwd, cout, cudnn = _case(layer, batch, dtype)
    heuristic = (ig.gemm_tiles, ig.wgrad_tiles)
    rows = []
    try:
        for cfg in FWD_CONFIGS:
            if cfg is not None:
                bm, bn, bk, w, s = cfg
                ig.gemm_tiles = lambda *a, **k: (bm, bk, x.shape[-1] % bk == 0, [(bn, w, s)])
            else:
                ig.gemm_tiles = heuristic[0]
            try:
                rows.append(("fwd", cfg, _bench(lambda: ig.conv_gemm(x, wp, geom, cout, pro=pro, stats=1))))
            except Exception as e:  # out of shared memory / registers: report and go on
                rows.append(("fwd", cfg, f"{type(e).__name__}"))
        ig.gemm_tiles = heuristic[0]
        if not (geom.phw == 4):   # G0's wgrad is a plain [nz x B] @ [B x 16 Cout]: not swept
            for cfg in WGRAD_CONFIGS:
                if cfg is not None:
                    bk, bn, bm, w, s = cfg
                    ig.wgrad_tiles = lambda m, cin, co, dt: (bk, cin % bk == 0, bn, [(bm, w, s)])
                else:
                    ig.wgrad_tiles = heuristic[1]
                try:
                    rows.append(("wgrad", cfg, _bench(lambda: ig.conv_wgrad(x, pro, bwd, geom))))
                except Exception as e:
                    rows.append(("wgrad", cfg, f"{type(e).__name__}"))
    finally:
        ig.gemm_tiles, ig.wgrad_tiles = heuristic
    return rows, _bench(cudnn)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--layers", default="G1,G2,G3,D1,D2,D3")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    wanted = args.layers.split(",")
    print("| layer | kernel | config (BM,BN,BK,w,s / wgrad BK,BN,BM,w,s) | ms | vs cuDNN conv fwd |")
    print("|---|---|---|---|---|")
    for layer in LAYERS:
        if layer[0].split()[0] not in wanted:
            continue
        rows, cudnn_ms = sweep(layer, args.batch, dtype)
        for kind, cfg, ms in rows:
            shown = f"{ms:.3f}" if isinstance(ms, float) else ms
            ratio = f"{cudnn_ms / ms:.2f}x" if isinstance(ms, float) else ""
            print(f"| {layer[0]} B={args.batch} {args.dtype} | {kind} | {cfg or 'heuristic'} | {shown} | {ratio} |",
                  flush=True)
        print(f"| {layer[0]} B={args.batch} {args.dtype} | cuDNN conv fwd | | {cudnn_ms:.3f} | |", flush=True)


if __name__ == "__main__":
    main()
