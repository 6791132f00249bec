"""Where the GPU time of one captured fastdcgan training step goes: torch.profiler over a few
graph replays, kernels grouped by name, the top ones printed as a markdown table.

    python benches/profile_step.py [--batch 128] [--precision bf16] [--replays 10] [--top 25]
"""
import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from peers import ours_step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
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
    print(f"### B={args.batch} {args.precision}: {step_us / 1e3:.3f} ms of kernel time per step, "
          f"{sum(count.values()) / args.replays:.0f} kernels per step")
    print("| kernel | launches/step | us/step | share |")
    print("|---|---|---|---|")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {name[:90]} | {count[name] / args.replays:.0f} | {us / args.replays:.1f} | "
              f"{us / args.replays / step_us:.1%} |")


if __name__ == "__main__":
    main()
