"""Sample-quality metrics: sliced Wasserstein distance (SWD) and Frechet Inception distance (FID).

SWD follows ProGAN (Karras et al. 2018, "Progressive Growing of GANs", appendix D): both image
sets are decomposed into Laplacian pyramids (5-tap binomial filter, levels down to 16 px; the
coarsest level is the low-pass residual), random 7x7 patches are taken from every image at every
level, each patch set is normalised per channel by its own mean/std, and the distance between the
two patch distributions is the mean absolute difference of their sorted projections onto random
unit directions, averaged over repeats and reported x1e3 per level (as ProGAN reports it).

FID needs an Inception network, which is not bundled: pass the TorchScript file that the
StyleGAN2-ADA metrics use (see `INCEPTION_URL`) to `load_inception`.
"""
import functools
import inspect
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")

# [1 4 6 4 1]/16: the binomial filter of the ProGAN / OpenCV (pyrDown, pyrUp) Gaussian pyramid.
_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)

# Images may overshoot [-1, 1] by rounding (tanh in reduced precision, resampling); more is a bug.
_RANGE_SLACK = 1e-3

# Work sizes that bound SWD's temporaries (images per pyramid batch, patches per gather).
_CHUNK_IMAGES = 256
_CHUNK_PATCHES = 65536


def _check_images(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, 3, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} is empty")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point in [-1, 1], got {x.dtype} "
                         "(convert uint8 NHWC images with fastdcgan.data.to_float)")
    lo, hi = (v.item() for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):  # min/max propagate NaN
        raise ValueError(f"{name} contains NaN or Inf")
    if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(f"{name} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")


# ----------------------------------------------------------------------------------------------
# Sliced Wasserstein distance


def _mirror(i, n):
    """Index i reflected into [0, n) without repeating the edge (scipy.ndimage 'mirror')."""
    i = -i if i < 0 else i
    return 2 * (n - 1) - i if i >= n else i


@functools.lru_cache(maxsize=None)
def _down_matrix(n):
    """(n/2, n): binomial filter with mirrored borders, then every even sample (cv2.pyrDown)."""
    m = torch.zeros(n // 2, n, dtype=torch.float64)
    for i in range(n // 2):
        for k, t in enumerate(_BINOMIAL):
            m[i, _mirror(2 * i + k - 2, n)] += t
    return m


@functools.lru_cache(maxsize=None)
def _up_matrix(n):
    """(2n, n): zeros inserted after every sample, then the binomial filter x2 with mirrored
    borders (cv2.pyrUp); x2 per axis restores the energy of the inserted zeros."""
    m = torch.zeros(2 * n, n, dtype=torch.float64)
    for j in range(2 * n):
        for k, t in enumerate(_BINOMIAL):
            src = _mirror(j + k - 2, 2 * n)
            if src % 2 == 0:
                m[j, src // 2] += 2 * t
    return m


def _laplacian_pyramid(x, num_levels):
    """num_levels NCHW levels, full resolution first; the last is the low-pass residual.

    The separable filters are applied as small banded matrices on both sides of each image
    (D x D^T, U x U^T): one BLAS call per axis, several times faster on CPU than shifted-slice
    sums or a depthwise conv2d, and exactly the same linear map.
    """
    levels = []
    for _ in range(num_levels - 1):
        h, w = x.shape[2:]
        dh, dw = (_down_matrix(n).to(x) for n in (h, w))
        uh, uw = (_up_matrix(n // 2).to(x) for n in (h, w))
        down = dh @ x @ dw.T
        levels.append(x - uh @ down @ uw.T)
        x = down
    levels.append(x)
    return levels


def _nhwc_pyramid(images, num_levels):
    """Pyramid levels as contiguous NHWC (a patch pixel's 3 channels in one row), built in chunks
    of images so the temporaries stay small."""
    n, _, h, w = images.shape
    out = [images.new_empty(n, h >> i, w >> i, 3, dtype=torch.float32) for i in range(num_levels)]
    for i in range(0, n, _CHUNK_IMAGES):
        for dst, lvl in zip(out, _laplacian_pyramid(images[i:i + _CHUNK_IMAGES].float(), num_levels)):
            dst[i:i + _CHUNK_IMAGES] = lvl.permute(0, 2, 3, 1)
    return out


def _patch_descriptors(level, owner, ys, xs, patch_size):
    """(M, patch_size**2 * 3) patches of an NHWC level, normalised per channel over the set.

    Patch j is cut from image owner[j] with top-left corner (ys[j], xs[j]).
    """
    _, h, w, c = level.shape
    rows = level.view(-1, c)
    device = level.device
    offs = torch.arange(patch_size, device=device)
    out = torch.empty(len(owner), patch_size, patch_size, c, device=device)
    for lo in range(0, len(owner), _CHUNK_PATCHES):
        hi = min(lo + _CHUNK_PATCHES, len(owner))
        n = owner[lo:hi].to(device)[:, None, None]
        y = ys[lo:hi].to(device)[:, None, None] + offs[None, :, None]
        x = xs[lo:hi].to(device)[:, None, None] + offs[None, None, :]
        out[lo:hi] = rows.index_select(0, ((n * h + y) * w + x).reshape(-1)).view(
            hi - lo, patch_size, patch_size, c)
    # Two passes with plain sums: torch.var_mean over the long axis is ~5x slower on CPU.
    flat = out.view(-1, c)
    flat -= flat.sum(0) / len(flat)
    std = ((flat * flat).sum(0) / len(flat)).sqrt().clamp_min(1e-8)  # guards a constant channel
    return flat.div_(std).view(len(owner), -1)


def _sorted_rows(x):
    """x (P, M) sorted along M; x is consumed (sorted in place on CPU)."""
    if x.is_cuda:
        return torch.sort(x, dim=1).values
    # numpy's SIMD sort is ~10x faster than torch.sort on CPU.
    x.numpy().sort(axis=1)
    return x


def swd(real, fake, *, seed=0, patches_per_image=32, patch_size=7, num_projections=128,
        num_repeats=4, min_resolution=16):
    """Sliced Wasserstein distance (x1e3) between two image sets, per pyramid level and averaged.

    real, fake: (N, 3, H, W) float tensors in [-1, 1], on any one device (N may differ).
    patches_per_image: patches per image per level. ProGAN used 128 (with 16k images); 32 keeps
        2,000 vs 2,000 images at 64x64 to a few CPU seconds, and the cost is proportional. Both
        sets contribute patches_per_image * min(N_real, N_fake) patches, spread evenly over their
        images. SWD of finite samples has a floor that falls as patches and images grow, so
        compare numbers only at equal N and patches_per_image.
    num_projections, num_repeats: random unit directions per repeat, and repeats averaged.
    min_resolution: the pyramid has a level for every resolution H, H/2, ... >= this.

    Patch positions and directions come from `seed` and are shared by both sets (common random
    numbers): the result is deterministic, a set scores exactly 0 against itself, and the
    comparison's variance is lower than with independent draws.

    Returns {"swd_<res>": value for each level (64, 32, 16 for 64x64 images), "swd_avg": mean}.
    """
    _check_images(real, "real")
    _check_images(fake, "fake")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real and fake image sizes differ: {tuple(real.shape[1:])} vs "
                         f"{tuple(fake.shape[1:])}")
    if real.device != fake.device:
        raise ValueError(f"real is on {real.device} but fake is on {fake.device}")
    for name, v in (("patches_per_image", patches_per_image), ("patch_size", patch_size),
                    ("num_projections", num_projections), ("num_repeats", num_repeats),
                    ("min_resolution", min_resolution)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    h, w = real.shape[2:]
    num_levels = 0
    while min(h, w) >> num_levels >= min_resolution:
        num_levels += 1
    if num_levels == 0:
        raise ValueError(f"images are {h}x{w}, smaller than min_resolution={min_resolution}")
    scale = 1 << (num_levels - 1)
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} must be divisible by {scale} for a "
                         f"{num_levels}-level pyramid down to {min_resolution} px")
    if min(h, w) // scale < patch_size:
        raise ValueError(f"patch_size={patch_size} exceeds the coarsest level "
                         f"({h // scale}x{w // scale})")

    gen = torch.Generator().manual_seed(seed)
    m = patches_per_image * min(len(real), len(fake))
    ramp = torch.arange(m)
    owners = [ramp * len(s) // m for s in (real, fake)]  # each image gets its share of patches
    pyramids = [_nhwc_pyramid(s, num_levels) for s in (real, fake)]
    result = {}
    for level in range(num_levels):
        lh, lw = h >> level, w >> level
        ys = torch.randint(0, lh - patch_size + 1, (m,), generator=gen)
        xs = torch.randint(0, lw - patch_size + 1, (m,), generator=gen)
        da, db = (_patch_descriptors(p[level], o, ys, xs, patch_size)
                  for p, o in zip(pyramids, owners))
        total = 0.0
        for _ in range(num_repeats):
            dirs = torch.randn(da.shape[1], num_projections, generator=gen)
            dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(da.device)
            # (P, M) layout: each direction's projections contiguous for the sort.
            pa, pb = _sorted_rows(dirs.T @ da.T), _sorted_rows(dirs.T @ db.T)
            total += F.l1_loss(pa, pb).item()  # mean |difference| over samples and directions
        result[f"swd_{min(lh, lw)}"] = 1e3 * total / num_repeats
    result["swd_avg"] = sum(result.values()) / num_levels
    return result


# ----------------------------------------------------------------------------------------------
# Frechet Inception distance


class InceptionFeatures:
    """A feature extractor plus how to call it: images float [-1, 1] (N, 3, H, W) -> (N, D).

    input_format "uint8": images are passed as uint8 NCHW in [0, 255] (StyleGAN2-ADA convention);
                 "float": as float32 in [-1, 1].
    return_features: pass `return_features=True` (the StyleGAN2-ADA Inception's pool features).
    """

    def __init__(self, model, input_format, return_features):
        if input_format not in ("uint8", "float"):
            raise ValueError(f"input_format must be 'uint8' or 'float', got {input_format!r}")
        self.model = model
        self.input_format = input_format
        self.return_features = return_features

    @property
    def device(self):
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def __call__(self, images):
        x = images.to(self.device)
        if self.input_format == "uint8":
            x = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        else:
            x = x.float()
        out = self.model(x, return_features=True) if self.return_features else self.model(x)
        if isinstance(out, (tuple, list)):
            raise ValueError("the Inception model returned a tuple/list; expected one (N, D) tensor "
                             "of features")
        if out.dim() == 4 and out.shape[2:] == (1, 1):  # pooled conv features (N, D, 1, 1)
            out = out.flatten(1)
        if out.dim() != 2 or out.shape[0] != len(images):
            raise ValueError(f"the Inception model must return (N, D) features for N={len(images)} "
                             f"images, got shape {tuple(out.shape)}")
        return out


def _accepts_return_features(model):
    forward = getattr(model, "forward", model)
    schema = getattr(forward, "schema", None)  # TorchScript methods carry their signature here
    if schema is not None:
        return any(a.name == "return_features" for a in schema.arguments)
    try:
        return "return_features" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _wrap(model, input_format="auto"):
    """Chooses the calling convention; see load_inception."""
    if isinstance(model, InceptionFeatures):
        return model
    rf = _accepts_return_features(model)
    if input_format == "auto":
        input_format = "uint8" if rf else "float"
    return InceptionFeatures(model, input_format, rf)


def load_inception(path, device="cpu", input_format="auto"):
    """Loads a TorchScript feature extractor for FID and decides how to call it.

    Detection: if the module's forward takes a `return_features` argument (the StyleGAN2-ADA
    `inception-2015-12-05.pt`), it is called as model(uint8 NCHW in [0, 255],
    return_features=True) -> (N, 2048). Any other module is called as model(x) -> (N, D) with
    float x in [-1, 1]; pass input_format="uint8" for one that expects uint8 [0, 255] instead
    (a module cannot tell us which range it wants, and the wrong one silently gives bad features).
    """
    if path is None or not os.path.isfile(os.fspath(path)):
        where = "no Inception file was given" if path is None else f"{path} does not exist"
        raise FileNotFoundError(
            f"FID needs an Inception network and {where}. Download the TorchScript file used by "
            f"the StyleGAN2-ADA metrics:\n  {INCEPTION_URL}\n"
            "and pass its path (python -m fastdcgan.evaluate --inception PATH, or "
            "fastdcgan.metrics.load_inception(PATH)).")
    try:
        with warnings.catch_warnings():
            # torch marks jit.load deprecated, but the published Inception is TorchScript only.
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(os.fspath(path), map_location=device)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a TorchScript module (torch.jit.load failed: {e})") from e
    return _wrap(model.eval(), input_format)


def inception_features(model, images, batch_size=64):
    """(N, D) float64 numpy features of images (N, 3, H, W) float in [-1, 1], batch by batch."""
    _check_images(images, "images")
    extractor = _wrap(model)
    feats = [extractor(images[i:i + batch_size]).double().cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(feats).numpy()


def feature_statistics(features):
    """Mean (D,) and covariance (D, D) of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_trace(a, b):
    """Tr(sqrtm(a @ b)) or None when sqrtm fails (non-finite, large imaginary part, or wrong)."""
    try:
        from scipy import linalg  # only FID needs scipy; it is not a core dependency
    except ImportError as e:
        raise ImportError("FID needs scipy (pip install scipy)") from e

    prod = a @ b
    with warnings.catch_warnings():  # "singular matrix" warnings: the result is checked below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(prod)
    if not np.isfinite(root).all():
        return None
    if np.iscomplexobj(root):
        # a @ b has real non-negative eigenvalues; imaginary parts are round-off unless large.
        if np.abs(root.imag).max() > 1e-3 * max(1.0, np.abs(root.real).max()):
            return None
        root = root.real
    residual = np.linalg.norm(root @ root - prod) / max(np.linalg.norm(prod), 1e-300)
    return None if residual > 1e-3 else float(np.trace(root))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64.

    When S1 S2 is near-singular (e.g. fewer samples than feature dimensions) and sqrtm is
    unreliable, eps is added to both diagonals and the root is taken again.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, "
                         f"sigma2 {s2.shape}; expected (D,) and (D, D)")
    tr = _sqrtm_trace(s1, s2)
    if tr is None:
        offset = eps * np.eye(d)
        tr = _sqrtm_trace(s1 + offset, s2 + offset)
    if tr is None:
        raise ValueError("sqrtm(sigma1 @ sigma2) failed even with an eps offset; are the "
                         "covariances finite and positive semi-definite?")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr)


def fid(real, fake, model, batch_size=64):
    """FID between image sets (N, 3, H, W) float in [-1, 1], with a load_inception() model."""
    if model is None:
        load_inception(None)  # raises the how-to-get-one message
    stats = [feature_statistics(inception_features(model, x, batch_size)) for x in (real, fake)]
    return frechet_distance(*stats[0], *stats[1])
