"""Whole training step on the GPU: the trainer's step with the fused Triton backend vs the same
step with the eager reference backend (cuDNN), same process, same card, same batch.

    python benches/step_table.py [--batches 128,512] [--precisions fp32,bf16] [--steps 20]

Prints a markdown table (median ms/step over --steps timed steps after 5 warm-up steps).
The step is uncaptured (no CUDA graph yet), so at B=128 launch overhead is part of both numbers.
"""
import argparse
import statistics
import tempfile

import torch

from fastdcgan.train import TrainConfig, Trainer


def time_steps(trainer, steps):
    for _ in range(5):
        trainer.train_step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        trainer.train_step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="128,512")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    print("| case | triton ms/step | reference ms/step | speedup | triton img/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for batch in map(int, args.batches.split(",")):
            for precision in args.precisions.split(","):
                ms = {}
                for backend in ("triton", "reference"):
                    cfg = TrainConfig(num_images=2048, batch_size=batch, ngf=64, ndf=64, steps=1,
                                      backend=backend, precision=precision, device="cuda", out=out)
                    ms[backend] = time_steps(Trainer(cfg, progress=False), args.steps)
                print(f"| train step B={batch} {precision} | {ms['triton']:.2f} | {ms['reference']:.2f} | "
                      f"{ms['reference'] / ms['triton']:.2f}x | {batch / ms['triton'] * 1e3:,.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
