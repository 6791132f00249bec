"""ImageFolderFaces: a folder tree of images (CelebA's img_align_celeba/ as is), decoded once in
parallel processes into a uint8 cache."""
import hashlib
import multiprocessing
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fastdcgan.data._common import FaceDataset, load_cached, save_cached
from fastdcgan.data._common import cache_dir as default_cache_dir

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CELEBA_CROP = 108
# Bump whenever decoding/transforming changes: it is part of the cache key.
TRANSFORM_VERSION = 1


def _center_crop(im, size):
    """torchvision's CenterCrop on a PIL image (zero padding when the image is smaller)."""
    w, h = im.size
    if size > w or size > h:
        pw, ph = max(size - w, 0), max(size - h, 0)
        padded = Image.new(im.mode, (w + pw, h + ph))
        padded.paste(im, (pw // 2, ph // 2))
        im, (w, h) = padded, padded.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def transform(im, size, crop=None):
    """The pytorch/examples DCGAN transform on a PIL image -> uint8 (size, size, 3): optional
    CenterCrop(crop), Resize(size) (short side, bilinear, long side truncated), CenterCrop(size)."""
    if im.mode != "RGB":
        im = im.convert("RGB")  # palette, grey, RGBA (alpha dropped), CMYK, ...
    if crop is not None:
        im = _center_crop(im, crop)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_long = int(size * long / short)
        im = im.resize((size, new_long) if w <= h else (new_long, size), Image.BILINEAR)
    return np.asarray(_center_crop(im, size), dtype=np.uint8)


def _decode(job):
    """Worker: (index, path, size, crop) -> (index, uint8 image or None if unreadable)."""
    i, path, size, crop = job
    try:
        with Image.open(path) as im:
            return i, transform(im, size, crop)
    except Exception:  # any decoder failure (truncated, corrupt, unsupported) just skips the file
        return i, None


def _pool_context():
    """fork where possible: quick, and no `if __name__ == "__main__":` guard needed in scripts.
    But a live CUDA context must not be forked; then forkserver/spawn workers (each pays for an
    import of torch)."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and not torch.cuda.is_initialized():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _parse_crop(crop):
    if crop is None:
        return None
    if isinstance(crop, str):
        if crop.lower() != "celeba":
            raise ValueError(f'crop must be an int, "celeba" or None, not {crop!r}')
        return CELEBA_CROP
    if int(crop) != crop or crop < 1:
        raise ValueError(f"crop must be a positive int, not {crop!r}")
    return int(crop)


def list_images(root):
    """Image files under root (recursive, case-insensitive extensions), sorted by relative path."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        found.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(EXTENSIONS))
    return sorted(found, key=lambda p: Path(p).relative_to(root).as_posix())


class ImageFolderFaces(FaceDataset):
    """Every image under `root`, transformed like pytorch/examples' DCGAN (CenterCrop(crop) if
    given -- crop="celeba" is the usual 108 -- then Resize(size) + CenterCrop(size)).

    The tree is decoded once, by `workers` processes (default: all CPUs), into a uint8 cache keyed
    by the folder's contents (relative paths, sizes, mtimes) and the transform; later runs load the
    cache. Unreadable files are skipped, with one warning counting them."""

    def __init__(self, root, size=64, crop=None, workers=None, cache_dir=None):
        root = Path(root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"image folder not found: {root}")
        if not root.is_dir():
            raise ValueError(f"not a folder of images: {root}")
        self.root, self.crop = root, _parse_crop(crop)
        files = list_images(root)
        if not files:
            raise ValueError(f"no images ({', '.join(e[1:] for e in EXTENSIONS)}) found under {root}")
        key = hashlib.sha256(f"v{TRANSFORM_VERSION} size={size} crop={self.crop}\n".encode())
        for f in files:
            st = os.stat(f)
            key.update(f"{Path(f).relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", root.resolve().name)[:40]
        self.cache_path = Path(default_cache_dir() if cache_dir is None else cache_dir) / (
            f"folder-{name}-{size}px-{key.hexdigest()[:20]}.npy")
        images = load_cached(self.cache_path, size)
        if images is None:
            images = self._decode_all(files, size, workers)
            save_cached(self.cache_path, images)
        super().__init__(images)

    def _decode_all(self, files, size, workers):
        out = np.empty((len(files), size, size, 3), np.uint8)
        ok = np.zeros(len(files), bool)
        jobs = [(i, f, size, self.crop) for i, f in enumerate(files)]
        workers = min((os.cpu_count() or 1) if workers is None else workers, len(files))
        with tqdm(total=len(files), desc=f"decoding {self.root.name}", unit="img") as bar:
            if workers <= 1:
                self._collect(map(_decode, jobs), out, ok, bar)
            else:
                chunk = max(1, min(256, len(files) // (workers * 8)))
                with _pool_context().Pool(workers) as pool:
                    self._collect(pool.imap_unordered(_decode, jobs, chunksize=chunk), out, ok, bar)
        if not ok.any():
            raise ValueError(f"none of the {len(files)} images under {self.root} could be read")
        if not ok.all():
            bad = [os.path.relpath(files[i], self.root) for i in np.flatnonzero(~ok)]
            examples = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            warnings.warn(f"skipped {len(bad)} unreadable image(s) of {len(files)} under {self.root}: {examples}",
                          stacklevel=3)
        return out if ok.all() else out[ok]

    @staticmethod
    def _collect(results, out, ok, bar):
        for i, img in results:
            if img is not None:
                out[i], ok[i] = img, True
            bar.update(1)

