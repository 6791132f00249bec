"""Score a trained generator: `python -m fastdcgan.evaluate --checkpoint CKPT`.

Generates --num images, compares them with --num real images by SWD (fastdcgan.metrics.swd) and,
given --inception PATH, by FID; prints a small table and optionally writes JSON (--json FILE).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastdcgan import metrics
from fastdcgan.checkpoint import CheckpointError, load_generator
from fastdcgan.generate import generate
from fastdcgan.models import BACKENDS, resolve_device


def evaluate_generator(generator, real, num=None, seed=0, inception=None, train_bn=False,
                       patches_per_image=32):
    """Scores `num` samples of generator (default: as many as real) against real images.

    real: (N, 3, 64, 64) float in [-1, 1]; inception: None (no FID) or a load_inception() model.
    Returns {"swd_64", "swd_32", "swd_16", "swd_avg", and "fid" when inception is given}.
    The same seed gives the same samples and the same SWD patches/directions.
    """
    num = len(real) if num is None else num
    fake = generate(generator, num, seed=seed, train_bn=train_bn)
    real = real.to(fake.device)
    result = metrics.swd(real, fake, seed=seed, patches_per_image=patches_per_image)
    if inception is not None:
        result["fid"] = metrics.fid(real, fake, inception)
    return result


def load_real(data, num, seed=0, device="cpu"):
    """`num` real images (a seeded random subset when the set is larger) as float [-1, 1]."""
    from fastdcgan.data import load_dataset, to_float  # the data package is heavier to import

    images = load_dataset(data, size=64, n=num).images
    if len(images) > num:
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num]
        images = images[keep.sort().values.numpy()]
    return to_float(images).to(device)


def format_table(result):
    rows = [(f"SWD x1e3 {k[4:]}" + ("" if k == "swd_avg" else " px"), v)
            for k, v in result.items() if k.startswith("swd_")]
    if "fid" in result:
        rows.append(("FID", result["fid"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:10.3f}" for name, value in rows)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastdcgan.evaluate",
                                description="Score a generator against real images (SWD, FID).")
    p.add_argument("--checkpoint", "--netG", dest="checkpoint", required=True,
                   help="checkpoint.pt from fastdcgan.train, or a pytorch/examples netG_epoch_N.pth")
    p.add_argument("--data", default="synthetic",
                   help="real images: 'synthetic' (the built-in faces) or an image folder")
    p.add_argument("--num", type=int, default=2000, help="generated and real images compared")
    p.add_argument("--inception", default=None,
                   help="TorchScript Inception for FID, e.g. inception-2015-12-05.pt from "
                        f"{metrics.INCEPTION_URL}; without it only SWD is computed")
    p.add_argument("--seed", type=int, default=0, help="latents, real subset and SWD sampling")
    p.add_argument("--patches-per-image", type=int, default=32,
                   help="SWD patches per image per level (ProGAN used 128; cost is proportional)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--train-bn", action="store_true",
                   help="generate with batch statistics instead of the running ones")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num < 2 or args.patches_per_image < 1:
        print("error: --num must be >= 2 and --patches-per-image >= 1", file=sys.stderr)
        return 1
    device = resolve_device(args.device)
    try:
        G = load_generator(args.checkpoint, device=device, backend=args.backend)
        inception = metrics.load_inception(args.inception, device) if args.inception else None
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    real = load_real(args.data, args.num, seed=args.seed, device=device)
    result = evaluate_generator(G, real, num=args.num, seed=args.seed, inception=inception,
                                train_bn=args.train_bn, patches_per_image=args.patches_per_image)
    seconds = time.perf_counter() - start
    print(f"{args.checkpoint}: {args.num} generated vs {len(real)} real images ({args.data}), "
          f"seed {args.seed}, {seconds:.1f} s")
    print(format_table(result))
    if args.json:
        record = {"checkpoint": str(args.checkpoint), "data": args.data, "num_fake": args.num,
                  "num_real": len(real), "seed": args.seed,
                  "patches_per_image": args.patches_per_image, "train_bn": args.train_bn,
                  "inception": args.inception, **result}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
