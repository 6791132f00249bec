"""Training data for fastdcgan: 64x64 RGB faces as uint8 NHWC tensors, and the batch source.

SyntheticFaces    procedurally rendered cartoon faces (offline, deterministic, cached)
ImageFolderFaces  any folder tree of images (CelebA's img_align_celeba/ as is), decoded once, cached
load_dataset      "synthetic" -> SyntheticFaces, a path -> ImageFolderFaces
EpochBatches      shuffled, rank-sharded float batches gathered on the device
to_float          uint8 NHWC -> float32 NCHW in [-1, 1]
cache_dir         where the caches live ($FASTDCGAN_CACHE, $XDG_CACHE_HOME/fastdcgan, ~/.cache/fastdcgan)
"""
from pathlib import Path

from fastdcgan.data._common import cache_dir, to_float
from fastdcgan.data.batches import EpochBatches
from fastdcgan.data.folder import ImageFolderFaces
from fastdcgan.data.synthetic import SyntheticFaces

__all__ = ["SyntheticFaces", "ImageFolderFaces", "EpochBatches", "load_dataset", "to_float", "cache_dir"]


def load_dataset(spec, size=64, **kw):
    """"synthetic" -> SyntheticFaces(size=size, **kw); anything else is a folder of images ->
    ImageFolderFaces(spec, size=size, **kw). Options of the other kind (n and seed are for the
    synthetic set, crop and workers for folders) are ignored, so a caller may pass them all."""
    if isinstance(spec, str) and spec == "synthetic":
        return SyntheticFaces(size=size, **{k: v for k, v in kw.items() if k not in ("crop", "workers")})
    if not Path(spec).expanduser().exists():
        raise FileNotFoundError(f"dataset {str(spec)!r} is neither 'synthetic' nor an existing folder")
    return ImageFolderFaces(spec, size=size, **{k: v for k, v in kw.items() if k not in ("n", "seed")})
