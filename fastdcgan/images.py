"""Image grids and loss plots written with Pillow and matplotlib (torchvision is not a dependency)."""
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def atomic_write(path, write):
    """Calls write(tmp_path) then renames it over `path`, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def make_grid(images, nrow=8, padding=2, pad_value=1.0):
    """(N, C, H, W) floats in [-1, 1] -> uint8 (H', W', 3) grid of nrow columns, like torchvision's."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, 1|3, H, W) tensor, got {shape}")
    x = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    fill = int(round((pad_value + 1) * 127.5)) if pad_value <= 1 else int(pad_value)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), fill, np.uint8)
    tiles = x.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + c * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = tiles[i]
    return grid


def save_grid(images, path, nrow=8, padding=2):
    """Writes a PNG grid of images in [-1, 1] atomically."""
    grid = make_grid(images, nrow=nrow, padding=padding)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def plot_losses(rows, path, title="DCGAN training"):
    """Loss curves (D, G) and D outputs from the trainer's log rows (dicts) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    has_swd = any(r.get("swd") not in (None, "") for r in rows)
    fig, axes = plt.subplots(1, 3 if has_swd else 2, figsize=(15 if has_swd else 11, 3.6))
    axes[0].plot(steps, [r["loss_d"] for r in rows], label="loss D", lw=1)
    axes[0].plot(steps, [r["loss_g"] for r in rows], label="loss G", lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_title(title)
    axes[0].legend()
    axes[1].plot(steps, [r["d_x"] for r in rows], label="D(x)", lw=1)
    axes[1].plot(steps, [r["d_g_z"] for r in rows], label="D(G(z))", lw=1)
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("step")
    axes[1].legend()
    if has_swd:
        pts = [(r["step"], float(r["swd"])) for r in rows if r.get("swd") not in (None, "")]
        axes[2].plot(*zip(*pts), marker="o", lw=1)
        axes[2].set_xlabel("step")
        axes[2].set_title("SWD to real (x1e3, lower is better)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
