"""The whole training step on the GPU: fastdcgan (fused Triton kernels + C++ ops, captured in one
CUDA graph; and uncaptured) against the peers of benches/peers.py, in this process on this card.

    python benches/step_table.py [--batches 128,512] [--steps 30] [--peers all|none|NAME,...]
                                 [--feeds prologues,dy,act,both]

Prints a markdown table: median ms/step over --steps steps (CUDA events, after warm-up), images/s
and each case's speed relative to the best peer measured at the same batch size. --feeds times our
step once per way of feeding the GEMMs (kernels/block.py, kernels/network.py): the producers'
transforms in the consumers' prologues, or dy / the activations / both (the default) written out
once per block.
"""
import argparse
import os
import statistics

import torch

from peers import PEERS, ours_step, peer_step


# --feeds: (FASTDCGAN_MATERIALIZE_ACT, FASTDCGAN_MATERIALIZE_DY) and the row label
FEEDS = {"prologues": ("0", "0", ", through the prologues"), "dy": ("0", "1", ", dy materialized"),
         "act": ("1", "0", ", activations materialized"),
         "both": ("1", "1", ", activations and dy materialized")}


def set_feed(feed):
    """Selects a way of feeding the GEMMs for the steps built and run until the next call."""
    act, dy, label = FEEDS[feed]
    os.environ["FASTDCGAN_MATERIALIZE_ACT"], os.environ["FASTDCGAN_MATERIALIZE_DY"] = act, dy
    return label


def median_ms(step, steps, warmup=5):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="128,512")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--peers", default="eager fp32,graph fp32,graph bf16 CL",
                   help=f"comma-separated subset of {PEERS}, 'all' or 'none'")
    p.add_argument("--precisions", default="fp32,bf16", help="our step's precisions to time")
    p.add_argument("--uncaptured", action="store_true", help="also time our step without the graph")
    p.add_argument("--feeds", help=f"comma-separated subset of {list(FEEDS)} (default: as the "
                   "environment's FASTDCGAN_MATERIALIZE_ACT / _DY say)")
    args = p.parse_args()
    peers = {"all": list(PEERS), "none": []}.get(args.peers, [n for n in args.peers.split(",") if n])
    feeds = args.feeds.split(",") if args.feeds else [None]
    unknown = [f for f in feeds if f is not None and f not in FEEDS]
    if unknown:
        p.error(f"unknown --feeds {unknown}; choose from {list(FEEDS)}")
    torch.backends.cudnn.benchmark = True
    print("| case | ms/step | img/s | vs best peer |")
    print("|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        rows = {}
        for feed in feeds:
            label = set_feed(feed) if feed else ""
            for precision in args.precisions.split(","):
                rows[f"fastdcgan {precision} (CUDA graph{label})"] = median_ms(
                    ours_step(batch, precision), args.steps)
                if args.uncaptured:
                    rows[f"fastdcgan {precision} (uncaptured{label})"] = median_ms(
                        ours_step(batch, precision, captured=False), args.steps)
        peer_ms = {}
        for name in peers:
            try:
                peer_ms[f"peer: {name}"] = median_ms(peer_step(name, batch), args.steps)
            except Exception as e:  # a peer that breaks (torch.compile) is reported, not fatal
                print(f"| peer: {name} B={batch} | failed: {type(e).__name__}: {str(e)[:120]} | | |")
        best = min(peer_ms.values(), default=None)
        for name, ms in {**rows, **peer_ms}.items():
            ratio = f"{best / ms:.2f}x" if best else ""
            print(f"| {name} B={batch} | {ms:.2f} | {batch / ms * 1e3:,.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
