"""Latent-space walks for interpolation grids.

Spherical interpolation (Shoemake 1985; White 2016, "Sampling Generative Networks") keeps
Gaussian latents at a typical norm along the path, where a straight line passes through
low-norm latents that the generator rarely saw in training.
"""
import torch

# Below this sin(angle) the two directions are treated as parallel: slerp's weights divide by it.
PARALLEL_EPS = 1e-6


def slerp(a, b, t):
    """Spherical interpolation from a (t=0) to b (t=1) along the last dimension.

    a, b: tensors (..., nz) of the same shape; t: a float or a tensor broadcastable against
    a.shape[:-1]. For unit vectors the result stays on the unit sphere; for others the norm
    varies smoothly between |a| and |b|. Nearly parallel (or antiparallel) pairs, where the
    great circle is undefined or numerically unstable, fall back to linear interpolation.
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device).unsqueeze(-1)
    a64, b64 = a.double(), b.double()  # the angle of nearly parallel vectors needs the precision
    cos = (torch.nn.functional.normalize(a64, dim=-1) *
           torch.nn.functional.normalize(b64, dim=-1)).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    parallel = sin.abs() < PARALLEL_EPS
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    t64 = t.double()
    wa = torch.where(parallel, 1 - t64, torch.sin((1 - t64) * omega) / safe_sin)
    wb = torch.where(parallel, t64, torch.sin(t64 * omega) / safe_sin)
    return (wa * a64 + wb * b64).to(a.dtype)


def interpolation_latents(rows, steps, nz=100, seed=0):
    """(rows * steps, nz) float32 latents: row r walks from one random N(0, I) latent to another
    in `steps` slerp steps (both ends included), rows in order, so a grid with `steps` columns
    shows one walk per row. Deterministic for a seed."""
    if rows < 1 or steps < 2 or nz < 1:
        raise ValueError(f"need rows >= 1, steps >= 2 and nz >= 1, got rows={rows}, "
                         f"steps={steps}, nz={nz}")
    gen = torch.Generator().manual_seed(seed)
    ends = torch.randn(2, rows, 1, nz, generator=gen)
    t = torch.linspace(0, 1, steps).view(1, steps)
    return slerp(ends[0].expand(rows, steps, nz), ends[1].expand(rows, steps, nz), t).reshape(-1, nz)
