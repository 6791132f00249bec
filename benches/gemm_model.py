"""A GPU-free lower bound on the GEMM time of one training step, per way of feeding the GEMMs.

Traces every launch of a bf16 training step (G(z); D on real and fake in one grouped pass,
backward into D's weights; D on the fakes, backward into G) with the launches recorded instead
of run, compiles each GEMM specialization for sm_90 (benches/compile_check.py), counts its
main-loop SASS, and bounds each launch by the largest of
    issue time   = programs x iterations x loop instructions x warps / (132 SMs x 4 per cycle)
    tensor time  = programs x iterations x 2*BLOCK_M*columns*BLOCK_K / 989 TFLOPS
    operand time = operand bytes / --operand-tbps (default 3 TB/s)
where the operand bytes are what the programs load tile by tile (gemm_traffic.py: each program
reads its A and B tiles every K step from L2, cp.async.cg bypassing L1, so an implicit GEMM
re-reads a stride-2 conv's input 4 times and a transposed conv's 16 times, half that with paired
column taps). 3 TB/s is about what the kernels tuned on an H100 in session 2 sustained (1.6-4.3
TB/s over the tile sweep's layers, benches/tune_gemm.py's "operand TB/s" column): a measured
rate, not the L2's peak.
A model, not a measurement: it ignores latencies and launch gaps, so use it to compare kernels,
tiles and feeds, and the GPU (benches/step_table.py, profile_step.py) for times.

    python benches/gemm_model.py [--batch 128] [--top 8] [--operand-tbps 3] [--inference]
"""
import argparse
import collections
import math
import os

os.environ.pop("TRITON_INTERPRET", None)   # model the GPU configurations

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import compile_check as cc  # noqa: E402
from gemm_traffic import iterations, mma_columns, operand_bytes  # noqa: E402
from step_table import FEEDS, set_feed  # noqa: E402

SMS, CLOCK, PEAK = 132, 1.83e9, 989e12   # H100 SXM: SMs, boost clock, dense bf16 FLOP/s
GEMMS = ("conv_gemm_kernel", "conv_wgrad_kernel", "tconv_wgrad_kernel", "tap_gemm_kernel")
# memory passes that belong to a GEMM (the input-stationary transposed conv's second step):
# bounded by their bytes alone, counted with the launch before them
GEMM_PASSES = ("tap_sum_kernel",)


def trace_step(batch, inference=False):
    """[(JITFunction, constexprs, warps, stages, grid, arguments)] of one bf16 step's launches (of
    the Generator's inference: eval mode, no gradient), and the compile_check recorder holding
    their specializations."""
    from fastdcgan import Discriminator, Generator, ops
    from fastdcgan.kernels import implicit_gemm

    implicit_gemm._num_sms = lambda device: SMS
    ops._check_device = lambda device: None
    rec, launches = cc.Recorder(), []

    def run(fn, *args, grid, warmup=False, num_warps=4, num_stages=3, **kw):
        rec.run(fn, *args, grid=grid, warmup=warmup, num_warps=num_warps, num_stages=num_stages,
                **kw)
        values = {**dict(zip((p.name for p in fn.params), args)), **kw}
        grid = grid(values) if callable(grid) else grid
        launches.append((fn, kw, num_warps, num_stages, math.prod(grid), values))

    original = JITFunction.run
    JITFunction.run = run
    try:
        torch.manual_seed(0)
        G = Generator(backend="triton").to(torch.bfloat16)
        D = Discriminator(backend="triton").to(torch.bfloat16)
        z = torch.randn(batch, 100, 1, 1, dtype=torch.bfloat16)
        if inference:
            with torch.no_grad():
                G.eval()(z)
            return launches, rec
        real = torch.randn(batch, 3, 64, 64, dtype=torch.bfloat16)
        fake = G(z)
        D.logits(torch.cat([real, fake.detach()]), groups=2).float().sum().backward()
        D.requires_grad_(False)   # the G update: D frozen
        D.logits(fake).float().sum().backward()
    finally:
        JITFunction.run = original
    return launches, rec


def bound(batch, feed, operand_rate, inference=False):
    """(total seconds, {kind: seconds}, [(seconds, description)]) for the feed, operands moving at
    operand_rate bytes/s (inference: of the Generator's inference, which has one feed)."""
    set_feed(feed)
    launches, rec = trace_step(batch, inference)
    loop_sass, per_kind, rows = {}, collections.defaultdict(float), []
    kind = None
    for fn, consts, warps, stages, programs, values in launches:
        name = fn.fn.__name__
        if name in GEMM_PASSES:
            seconds = operand_bytes(name, consts, programs, values, 2) / operand_rate
            per_kind[kind] += seconds
            rows.append((seconds, f"{name} {kind} {consts['COUT']} channels at "
                                  f"{consts['OH']}x{consts['OW']}: {programs} programs; "
                                  f"memory {seconds * 1e6:.1f} us"))
            continue
        if name not in GEMMS:
            continue
        key = (fn, tuple(sorted(consts.items())), warps, stages)
        if key not in loop_sass:
            spec = next(v for v in rec.launches.values()
                        if v[0] is fn and v[2] == consts and v[4] == warps and v[5] == stages)
            loop_sass[key] = cc.compile_one(*spec, loops=True)["loop_sass"]
        bm, bn, bk = consts["BLOCK_M"], mma_columns(consts), consts["BLOCK_K"]
        if name in ("conv_gemm_kernel", "tap_gemm_kernel"):
            kind = "dgrad" if consts["W_T"] else "forward"
        else:
            kind = "wgrad"
        steps = iterations(name, consts, values)
        issue = programs * steps * loop_sass[key] * warps / (SMS * 4) / CLOCK
        tensor = programs * steps * 2 * bm * bn * bk / PEAK
        traffic = operand_bytes(name, consts, programs, values, 2) / operand_rate
        seconds = max(issue, tensor, traffic)
        per_kind[kind] += seconds
        shape = (f"{consts['CIN']}->{consts['COUT']}" +
                 (f" at {consts['IH']}x{consts['IW']}" if "IH" in consts else ""))
        rows.append((seconds, f"{name} {kind} {shape}: {programs} programs x {steps} "
                              f"iterations x {loop_sass[key]} SASS; issue {issue * 1e6:.1f} us, "
                              f"tensor {tensor * 1e6:.1f} us, operands {traffic * 1e6:.1f} us"))
    return sum(per_kind.values()), per_kind, rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--top", type=int, default=8, help="the most expensive launches listed per feed")
    p.add_argument("--operand-tbps", type=float, default=3.0,
                   help="the rate (TB/s) at which the GEMMs load their operand tiles")
    p.add_argument("--inference", action="store_true",
                   help="the Generator's inference (eval mode: BN folded into the epilogues, each "
                        "activation materialized) instead of a training step")
    args = p.parse_args()
    if args.inference:
        total, _, rows = bound(args.batch, "both", args.operand_tbps * 1e12, inference=True)
        print(f"Generator inference, B={args.batch} bf16, operands at {args.operand_tbps:g} TB/s: "
              f"GEMM bound {total * 1e3:.3f} ms")
        for seconds, what in sorted(rows, reverse=True)[:args.top]:
            print(f"  {seconds * 1e6:6.1f} us  {what}")
        return
    print(f"| feed (B={args.batch} bf16, operands at {args.operand_tbps:g} TB/s) | GEMM bound ms | "
          "forward | data gradient | weight gradient |")
    print("|---|---|---|---|---|")
    details = []
    for feed in FEEDS:
        total, per_kind, rows = bound(args.batch, feed, args.operand_tbps * 1e12)
        print(f"| {feed} | {total * 1e3:.3f} | " + " | ".join(
            f"{per_kind[k] * 1e3:.3f}" for k in ("forward", "dgrad", "wgrad")) + " |", flush=True)
        details.append((feed, sorted(rows, reverse=True)[:args.top]))
    for feed, rows in details:
        print(f"\n{feed}: the most expensive launches")
        for seconds, what in rows:
            print(f"  {seconds * 1e6:6.1f} us  {what}")


if __name__ == "__main__":
    main()
