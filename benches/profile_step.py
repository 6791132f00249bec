"""Where the GPU time of one captured fastdcgan training step goes: torch.profiler over a few
graph replays, kernels grouped by name, the top ones printed as a markdown table.

    python benches/profile_step.py [--batch 128] [--precision bf16] [--replays 10] [--top 25]
                                   [--sequence] [--generator]

--sequence also lists every kernel of one replay in launch order with its grid, block,
registers and shared memory (from the profiler's trace), so each GEMM's time can be told apart
(the grid says which layer: (column tiles, phases, row tiles) for conv_gemm_kernel).
--generator profiles Generator inference (eval, replayed from its CUDA graph: the case
benches/bench_generator.py times as "ours (CUDA graph)") instead of the training step.
"""
import argparse
import json
import os
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from layer_table import generator_cases
from peers import ours_step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sequence", action="store_true", help="every kernel of one replay, in order")
    p.add_argument("--generator", action="store_true", help="Generator inference, not the step")
    args = p.parse_args()
    if args.generator:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
        step = torch.no_grad()(generator_cases(args.batch, dtype, compiled=False)["ours (CUDA graph)"])
    else:
        step = ours_step(args.batch, args.precision)
    for _ in range(6):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.replays):
            step()
        torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.time_range.elapsed_us()
            count[ev.name] += 1
    step_us = sum(total.values()) / args.replays
    what = "Generator inference" if args.generator else "step"
    print(f"### B={args.batch} {args.precision}: {step_us / 1e3:.3f} ms of kernel time per {what}, "
          f"{sum(count.values()) / args.replays:.0f} kernels per {what}")
    print("| kernel | launches/step | us/step | share |")
    print("|---|---|---|---|")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {name[:90]} | {count[name] / args.replays:.0f} | {us / args.replays:.1f} | "
              f"{us / args.replays / step_us:.1%} |")
    if args.sequence:
        print_sequence(step)


def print_sequence(step):
    """One replay's kernels in launch order, from the profiler's Chrome trace."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    print("\n| # | kernel | grid | block | regs | shared B | us |")
    print("|---|---|---|---|---|---|---|")
    for i, e in enumerate(kernels):
        a = e.get("args", {})
        print(f"| {i} | {e['name'][:48]} | {a.get('grid', '')} | {a.get('block', '')} | "
              f"{a.get('registers per thread', '')} | {a.get('shared memory', '')} | "
              f"{e.get('dur', 0):.1f} |")


if __name__ == "__main__":
    main()
