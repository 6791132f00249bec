"""Sample faces from a trained generator: `python -m fastdcgan.generate --checkpoint CKPT`.

Accepts a fastdcgan checkpoint (checkpoint.pt from fastdcgan.train) or a bare pytorch/examples
`netG_epoch_N.pth`. Writes one PNG grid. On a GPU the eval-mode generator is sampled through a
CUDA graph (fastdcgan.sampler.CapturedGenerator).
"""
import argparse
import sys

import torch

from fastdcgan.checkpoint import CheckpointError, load_generator
from fastdcgan.images import save_grid
from fastdcgan.latent import interpolation_latents
from fastdcgan.models import BACKENDS, resolve_device
from fastdcgan.sampler import CapturedGenerator


def generate(generator, num, seed=0, train_bn=False, batch_size=512, cuda_graph=True):
    """num images in [-1, 1] from N(0, I) latents drawn with `seed` (same seed, same images)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return generate_from(generator, torch.randn(num, generator.nz, generator=gen), train_bn, batch_size,
                         cuda_graph)


def generate_from(generator, z, train_bn=False, batch_size=512, cuda_graph=True):
    """Images for latents z (N, nz).

    train_bn=False uses the running BN statistics (G.eval()), as at deployment; True normalises
    with each batch's own statistics, as during training (the two differ, most early in training).
    cuda_graph: on a GPU, an eval-mode generator runs as one CUDA graph per batch_size latents
    (fastdcgan.sampler), else op by op.
    """
    z = z.to(next(generator.parameters()).device)
    was_training = generator.training
    generator.train(train_bn)
    try:
        if cuda_graph and not train_bn and z.is_cuda:
            return _sample_captured(generator, z, batch_size)
        with torch.no_grad():
            # Batch statistics depend on the batch, so train_bn runs all latents as one batch.
            chunks = [z] if train_bn else z.split(batch_size)
            return torch.cat([generator(zb) for zb in chunks])
    finally:
        generator.train(was_training)


def _sample_captured(generator, z, batch_size):
    """Eval-mode images for z through one graph of min(batch_size, N) latents: the last partial
    batch is padded with zero latents whose images are dropped (eval-mode outputs are per-sample,
    so the padding changes nothing)."""
    sampler = CapturedGenerator(generator, min(batch_size, len(z)))
    b, out = sampler.batch_size, None
    for start in range(0, len(z), b):
        zb = z[start:start + b]
        n = len(zb)
        if n < b:
            zb = torch.cat([zb, zb.new_zeros((b - n,) + zb.shape[1:])])
        images = sampler(zb)
        if out is None:
            out = images.new_empty((len(z),) + images.shape[1:])
        out[start:start + n] = images[:n]
    return out


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastdcgan.generate",
                                description="Write a grid of generated faces.")
    p.add_argument("--checkpoint", "--netG", dest="checkpoint", required=True,
                   help="checkpoint.pt from fastdcgan.train, or a pytorch/examples netG_epoch_N.pth")
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--nrow", type=int, default=8, help="images per grid row")
    p.add_argument("--interpolate", type=int, default=0, metavar="K",
                   help="instead of --num samples: K rows, each a spherical (slerp) walk of --nrow "
                        "steps between two random latents")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--train-bn", action="store_true",
                   help="normalise with batch statistics instead of the running ones (G.eval(), "
                        "the default); early in training the two give visibly different images")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="on a GPU, run the generator op by op instead of replaying a CUDA graph")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num <= 0 or args.nrow <= 0 or args.interpolate < 0:
        print("error: --num and --nrow must be positive, --interpolate >= 0", file=sys.stderr)
        return 1
    device = resolve_device(args.device)
    try:
        G = load_generator(args.checkpoint, device=device, backend=args.backend)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.interpolate > 0:
        z = interpolation_latents(args.interpolate, args.nrow, G.nz, seed=args.seed)
        images = generate_from(G, z, train_bn=args.train_bn, cuda_graph=args.cuda_graph)
    else:
        images = generate(G, args.num, seed=args.seed, train_bn=args.train_bn,
                          cuda_graph=args.cuda_graph)
    save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {len(images)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
