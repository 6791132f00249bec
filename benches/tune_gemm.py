"""Tile sweep for the implicit-GEMM kernels at the DCGAN layer shapes, writing the tile table that
kernels/implicit_gemm.py reads (FASTDCGAN_TILES, or kernels/tiles.json).

For each layer (G1-G3, D1-D3: every GEMM-heavy layer), dtype and batch (128, 512: the tuned
points; D's also at 256 and 1024, the rows of its grouped pass over real and fake) it times, as
the chained network runs them, the forward GEMM (BN statistics in the epilogue), the data
gradient (the producer's BN backward sums in the epilogue; without its own entry it takes the
forward tile of the same geometry) and the split-K weight gradient over a few tile
configurations, with their operands read raw (the default feed: activations and dy materialized)
or, with --feed prologues, through the producer's BN-apply + activation / the BN + activation
backward, or with --feed tma raw and loaded as TMA boxes (FASTDCGAN_TMA=1: the forward and the
data gradient, under keys of their own); it keeps the fastest when it beats the heuristic (for
tma: the raw feed's tile) by over 3%, and compares with cuBLAS
running the same GEMMs on plain matrices and with cuDNN's convolution. A second table gives the
forward GEMM's time by operand prologue (raw, BN-apply, BN-backward) against an elementwise
materializing pass.

    python benches/tune_gemm.py --compile-only --layers D2 --dtypes bf16   # fill the Triton cache
    python benches/tune_gemm.py --write tiles.json                        # time, print, write
    python benches/tune_gemm.py --feed prologues --write tiles.json   # operands through prologues
    python benches/tune_gemm.py --feed tma --write tiles.json         # raw operands as TMA boxes
"""
import argparse
import inspect
import json
import math
import os

import torch
import torch.nn.functional as F
import triton.testing

from fastdcgan.kernels import implicit_gemm as ig
from fastdcgan.kernels.bn import bn_apply
from fastdcgan.kernels.weights import kernel_weights
from gemm_traffic import operand_bytes
from layer_table import LAYERS

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# gemm: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); bf16 K rows of 64 (128 bytes), fp32 32
# 5 stages, or a 128-wide K step (fp32's last two): deeper pipelines, since with cp.async loads
# and one CTA per SM 3 stages may not cover the L2 latency of a short K iteration. 256 x 64
# (bf16, forward and data gradient): for Cout = 64 the weight tile is a third of a 128 x 64 tile's
# operand bytes per K step, a fifth of a 256 x 64 one's (benches/gemm_model.py: 0.83x the bytes).
# One stage (the last bf16 forward and data-gradient candidates): no cp.async pipeline, so the
# tiles load with plain LDG.E.128, which L1 caches (cp.async.cg bypasses it): a transposed conv's
# phase GEMM reads its input window once per row tap (paired column taps), twice in a row, and
# the stride-2 conv's taps overlap too; L1 may serve those re-reads that the pipelined kernels
# fetch from L2 (the bytes bound them: gemm_model.py). Latency is then hidden by occupancy:
# 24-32 KB of shared memory a CTA (compile_check under triton 3.6, sm_90), so registers decide
# how many CTAs an SM holds.
FWD_CONFIGS = {
    "bf16": [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
             (128, 128, 32, 8, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 64, 64, 8, 3),
             (128, 128, 64, 8, 5), (128, 128, 128, 8, 3), (128, 64, 64, 4, 1),
             (128, 128, 64, 8, 1)],
    "fp32": [(128, 128, 32, 8, 3), (128, 128, 32, 4, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
             (64, 64, 32, 4, 4), (256, 128, 32, 8, 3), (128, 128, 16, 4, 4),
             (128, 128, 32, 8, 5), (128, 128, 64, 8, 3)],
}
# wgrad: (BLOCK_K weight rows, BLOCK_N, BLOCK_M pixels per step, num_warps, num_stages); a
# 128-pixel step halves the per-step row decoding, for raw operands (64 KB a stage in bf16);
# 256 weight rows (raw operands' heuristic, implicit_gemm.wgrad_tiles) re-read dy half as often
WGRAD_CONFIGS = {
    "bf16": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 8, 4),
             (64, 64, 128, 4, 3), (128, 128, 64, 8, 5), (128, 128, 128, 8, 3),
             (256, 128, 64, 8, 3)],
    "fp32": [(64, 128, 32, 8, 3), (64, 64, 64, 4, 3), (128, 64, 32, 8, 3), (32, 128, 64, 4, 3),
             (64, 128, 64, 8, 2), (64, 128, 32, 8, 5)],
}
# dgrad (the data gradient: BN + activation backward in the prologue, the producer's BN backward
# sums in the epilogue; same tuple as gemm), fitted by conv_gemm to the kernels' register budget
# for it (implicit_gemm.ACC_REGS: <= 64 accumulator registers per thread, the forward's 128 with
# paired column taps; <= 3 stages)
DGRAD_CONFIGS = {
    "bf16": [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 3),
             (64, 64, 64, 4, 3), (256, 64, 64, 8, 3), (128, 64, 64, 4, 1)],
    "fp32": [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3),
             (128, 128, 16, 8, 3)],
}
BATCHES = (128, 512)


def _batches(layer, batches):
    """The batch sizes a layer's GEMMs run at: D's also at twice each, since the training step
    scores real and fake images in one grouped pass (Discriminator.logits(x, groups=2))."""
    if layer[0].startswith("D"):
        return sorted({b * k for b in batches for k in (1, 2)})
    return list(batches)


def _case(layer, batch, dtype, raw=False, boxed=False):
    _, transposed, cin, cout, hw, stride, pad, _, _ = layer
    oh = ig.conv_out_size(transposed, stride, pad, hw)
    geom = ig.make_geom(transposed, stride, pad, hw, hw, oh, oh)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, hw, hw, cin, generator=g).to("cuda", dtype)
    w = (torch.randn((cin, cout, 4, 4) if transposed else (cout, cin, 4, 4), generator=g) * 0.02).cuda()
    wp = kernel_weights([w], [transposed], dtype)[0]
    pro = ig.Xform(torch.rand(cin, device="cuda") + 0.5, torch.randn(cin, device="cuda") * 0.1, 1, 0.0)
    dy = torch.randn(batch, oh, oh, cout, generator=g).to("cuda", dtype)
    bwd = ig.BwdOperand(dy, torch.randn_like(dy), None, None, None, None, None, 0, 0.0)
    m_rows = batch * geom.mh * geom.mw * geom.phases
    # the data gradient as the chained network runs it: dy from this layer's BN + ReLU backward
    # (prologue), the producer's BN backward sums at x's positions (epilogue)
    geom_d = ig.make_geom(not transposed, stride, pad, oh, oh, hw, hw)
    cvec = lambda: torch.randn(cout, device="cuda") * 0.1  # noqa: E731
    bwd_d = ig.BwdOperand(dy, torch.randn_like(dy), cvec() + 1.0, cvec(), cvec(), cvec(), cvec(), 1, 0.0)
    prod = (x, pro.scale, pro.shift, torch.randn(cin, device="cuda") * 0.1,
            torch.rand(cin, device="cuda") + 0.5, 1, 0.0)
    keys = {"gemm": ig.tile_key("gemm", geom, cin, cout, m_rows, dtype, raw, boxed),
            "dgrad": ig.tile_key("dgrad", geom_d, cout, cin,
                                 batch * geom_d.mh * geom_d.mw * geom_d.phases, dtype, raw, boxed),
            "wgrad": ig.tile_key("wgrad", geom, cin, cout, m_rows, dtype, raw)}
    if raw:   # activations and dy materialized (FASTDCGAN_MATERIALIZE_ACT=1, _DY=1)
        runs = {"gemm": lambda: ig.conv_gemm(x, wp, geom, cout, stats=1),
                "dgrad": lambda: ig.conv_gemm(dy, wp, geom_d, cin, w_t=True, stats=2, prod=prod),
                "wgrad": lambda: ig.conv_wgrad(x, None, dy, geom)}
    else:
        runs = {"gemm": lambda: ig.conv_gemm(x, wp, geom, cout, pro=pro, stats=1),
                "dgrad": lambda: ig.conv_gemm(None, wp, geom_d, cin, w_t=True, bwd=bwd_d, stats=2,
                                              prod=prod),
                "wgrad": lambda: ig.conv_wgrad(x, pro, bwd, geom)}
    xn = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    wc = w.to(dtype).contiguous(memory_format=torch.channels_last)
    conv = F.conv_transpose2d if transposed else F.conv2d
    cudnn = lambda: conv(xn, wc, stride=stride, padding=pad)  # noqa: E731
    # the same GEMMs without the convolution (per phase: [M, K] @ [K, N] forward, [K, M] @ [M, N]
    # weight gradient) through cuBLAS: what a GEMM of this size costs when its operands are
    # plain matrices, i.e. how much of our time is the implicit-GEMM addressing
    m, k = batch * geom.mh * geom.mw, geom.t * geom.t * cin
    a = torch.randn(geom.phases, m, k, device="cuda", dtype=dtype)
    b = torch.randn(geom.phases, k, cout, device="cuda", dtype=dtype)
    c = torch.randn(geom.phases, m, cout, device="cuda", dtype=dtype)
    md, kd = batch * geom_d.mh * geom_d.mw, geom_d.t * geom_d.t * cout
    ad = torch.randn(geom_d.phases, md, kd, device="cuda", dtype=dtype)
    bd = torch.randn(geom_d.phases, kd, cin, device="cuda", dtype=dtype)
    dense = {"gemm": lambda: torch.bmm(a, b), "dgrad": lambda: torch.bmm(ad, bd),
             "wgrad": lambda: torch.bmm(a.transpose(1, 2), c)}
    # what the operand prologues cost: the same forward GEMM (same tile) reading its input raw
    # (MODE 0), through the producer's BN-apply + ReLU (MODE 1, what the chained forward does),
    # and through the BN + activation backward (MODE 2, what the data gradient does: it reads two
    # tensors); and the elementwise pass that would materialize the operand instead
    vec = lambda: torch.randn(cin, device="cuda") * 0.1  # noqa: E731
    bwd_pro = ig.BwdOperand(torch.randn_like(x), x, pro.scale, pro.shift, vec(), vec(), vec(), 1, 0.0)
    prologues = {"raw": lambda: ig.conv_gemm(x, wp, geom, cout, stats=1),
                 "bn-apply": runs["gemm"],
                 "bn-backward": lambda: ig.conv_gemm(None, wp, geom, cout, bwd=bwd_pro, stats=1),
                 "apply pass": lambda: bn_apply(x, pro.scale, pro.shift, 1, 0.0, x.dtype)}
    return keys, runs, cudnn, dense, prologues


def _run_measuring_operands(run):
    """Runs `run` (one GEMM launch) and returns the bytes of operand tiles its programs load
    (gemm_traffic.operand_bytes), from the launch's grid, tile and arguments."""
    seen = []
    original = ig._launch_one

    def spy(kernel, grid, args, consts, cfg):
        seen.append((kernel, grid, args, consts, cfg))
        return original(kernel, grid, args, consts, cfg)

    ig._launch_one = spy
    try:
        run()
    finally:
        ig._launch_one = original
    kernel, grid, args, consts, cfg = seen[-1]
    values = dict(zip(inspect.signature(kernel.fn).parameters, args))
    return operand_bytes(kernel.fn.__name__, {**consts, **cfg.kwargs}, math.prod(grid(cfg.kwargs)),
                         values, args[0].element_size())


def sweep(layer, batch, dname, compile_only, raw=False, boxed=False):
    """{kind: [(config or None for the heuristic, ms or error name, operand bytes)]}, cuDNN ms,
    keys, {kind: cuBLAS ms of the same GEMMs on plain matrices}. boxed: the GEMMs that load TMA
    boxes (not the weight gradient), with FASTDCGAN_TMA=1 set by the caller."""
    keys, runs, cudnn, dense, prologues = _case(layer, batch, DTYPES[dname], raw, boxed)
    table = ig.tile_table()
    results = {}
    kinds = (("gemm", FWD_CONFIGS[dname]), ("dgrad", DGRAD_CONFIGS[dname]),
             ("wgrad", WGRAD_CONFIGS[dname]))
    for kind, configs in kinds[:2] if boxed else kinds:
        saved = table.pop(keys[kind], None)
        rows = []
        for cfg in [None, *configs]:
            if cfg is not None:
                table[keys[kind]] = list(cfg)
            nbytes = 0
            try:
                nbytes = _run_measuring_operands(runs[kind])
                ms = 0.0 if compile_only else triton.testing.do_bench(runs[kind], warmup=5, rep=30)
            except Exception as e:  # out of shared memory / registers: report and go on
                ms = type(e).__name__
            rows.append((cfg, ms, nbytes))
            table.pop(keys[kind], None)
        if saved is not None:
            table[keys[kind]] = saved
        results[kind] = rows
    if compile_only:
        for fn in prologues.values():
            fn()
        return results, 0.0, keys, {}, {}
    torch.backends.cuda.matmul.allow_tf32 = True   # TF32 like our fp32 kernels
    dense_ms = {kind: triton.testing.do_bench(fn, warmup=5, rep=30) for kind, fn in dense.items()}
    prologue_ms = {name: triton.testing.do_bench(fn, warmup=5, rep=30) for name, fn in prologues.items()}
    return results, triton.testing.do_bench(cudnn, warmup=5, rep=30), keys, dense_ms, prologue_ms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", default="G1,G2,G3,D1,D2,D3")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--compile-only", action="store_true", help="run each config once (fills the cache)")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--feed", choices=("raw", "prologues", "tma"), default="raw",
                   help="the GEMMs' operands as the chained network feeds them by default (raw: "
                        "activations and dy materialized), through the producers' transforms "
                        "(FASTDCGAN_MATERIALIZE_ACT=0 and _DY=0), or raw as TMA boxes "
                        "(FASTDCGAN_TMA=1); raw and tma tiles have keys of their own")
    p.add_argument("--write", default=None,
                   help="write the tile table here: the winning tiles, and the current table's "
                        "entries for what this run did not sweep")
    args = p.parse_args()
    os.environ["FASTDCGAN_TMA"] = "1" if args.feed == "tma" else "0"
    layers = [l for l in LAYERS if l[0].split()[0] in args.layers.split(",")]
    best, prologue_rows, swept = {}, [], set()
    if not args.compile_only:
        # operand TB/s: the best config's operand tiles (gemm_traffic.operand_bytes) per second
        print("| layer | kernel | heuristic ms | best ms | best config | speedup | operand TB/s "
              "| cuBLAS same GEMM ms | cuDNN conv fwd ms |")
        print("|---|---|---|---|---|---|---|---|---|")
    for dname in args.dtypes.split(","):
        for layer in layers:
            for batch in _batches(layer, [int(b) for b in args.batches.split(",")]):
                results, cudnn_ms, keys, dense_ms, prologue_ms = sweep(
                    layer, batch, dname, args.compile_only, args.feed != "prologues",
                    args.feed == "tma")
                swept.update(keys.values())
                if args.compile_only:
                    continue
                prologue_rows.append(f"| {layer[0]} B={batch} {dname} | " + " | ".join(
                    f"{prologue_ms[k]:.3f}" for k in ("raw", "bn-apply", "bn-backward", "apply pass")) + " |")
                for kind, rows in results.items():
                    timed = [r for r in rows if isinstance(r[1], float)]
                    heur = next(ms for cfg, ms, _ in rows if cfg is None)
                    cfg, ms, nbytes = min(timed, key=lambda r: r[1])
                    if cfg is not None and isinstance(heur, float) and ms < 0.97 * heur:
                        best[keys[kind]] = list(cfg)
                    heur_s = f"{heur:.3f}" if isinstance(heur, float) else heur
                    gain = f"{heur / ms:.2f}x" if isinstance(heur, float) else ""
                    print(f"| {layer[0]} B={batch} {dname} | {kind} | {heur_s} | {ms:.3f} | "
                          f"{cfg or 'heuristic'} | {gain} | {nbytes / ms / 1e9:.1f} | "
                          f"{dense_ms[kind]:.3f} | {cudnn_ms:.3f} |", flush=True)
    if prologue_rows:
        print("\nForward GEMM at the table's tile, by operand prologue (ms), and the elementwise pass "
              "that would materialize the operand instead:\n")
        print("| layer | raw (MODE 0) | BN-apply + ReLU (MODE 1) | BN backward (MODE 2) | apply pass |")
        print("|---|---|---|---|---|")
        print("\n".join(prologue_rows))
    if args.write:
        kept = {k: v for k, v in ig.tile_table().items() if k not in swept}
        table = sorted({**kept, **best}.items())
        with open(args.write, "w") as f:   # one entry a line, as kernels/tiles.json keeps them
            f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in table)
                    + "\n}\n")
        print(f"wrote {len(best)} tuned tiles and kept {len(kept)} unswept entries in {args.write}")


if __name__ == "__main__":
    main()
