"""Pieces shared by the datasets: the cache directory and its atomic .npy files, the uint8 ->
[-1, 1] conversion, and the dataset base class."""
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def cache_dir():
    """Where decoded/rendered datasets are cached: $FASTDCGAN_CACHE if set, else
    $XDG_CACHE_HOME/fastdcgan, else ~/.cache/fastdcgan (not created here)."""
    if os.environ.get("FASTDCGAN_CACHE"):
        return Path(os.environ["FASTDCGAN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fastdcgan"
    return Path.home() / ".cache" / "fastdcgan"


def load_cached(path, size):
    """The uint8 (N, size, size, 3) array cached at path, or None if absent or unusable."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (size, size, 3):
        return None
    return arr


def save_cached(path, arr):
    """Write arr to path atomically: a temp file in the same directory, renamed over it, so a
    crash or a concurrent writer never leaves a half-written cache behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# x * (1 / 127.5) - 1 maps uint8 to [-1, 1]. A multiply by the fp32 reciprocal, not a division:
# that is what eager CUDA does for a division by a scalar, so CPU, CUDA and the fused gather
# kernel (kernels/gather.py) give the same bits.
U8_TO_UNIT = 1 / 127.5


def to_float(images):
    """uint8 NHWC images (B, H, W, 3), on any device, -> contiguous float32 (B, 3, H, W) in [-1, 1],
    as x * (1 / 127.5) - 1."""
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {tuple(images.shape)}")
    if images.is_floating_point():
        raise TypeError(f"expected integer (uint8) images, got {images.dtype}")
    x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return x.mul_(U8_TO_UNIT).sub_(1.0)


class FaceDataset(torch.utils.data.Dataset):
    """A fixed set of RGB images held as one uint8 tensor `.images` (N, size, size, 3), CPU.
    Items are float32 (3, size, size) in [-1, 1]."""

    def __init__(self, images):
        self.images = torch.from_numpy(images)
        self.size = images.shape[1]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_float(self.images[i][None])[0]
