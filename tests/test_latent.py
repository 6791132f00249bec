import math

import pytest
import torch

from fastdcgan.latent import interpolation_latents, slerp


def unit(*shape, seed=0):
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=-1, keepdim=True)


def test_slerp_endpoints():
    a, b = torch.randn(2, 100, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)


def test_slerp_stays_on_unit_sphere_at_constant_speed():
    a, b = unit(100, seed=1), unit(100, seed=2)
    t = torch.linspace(0, 1, 11)
    path = slerp(a.expand(11, 100), b.expand(11, 100), t)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(11))
    # Equal angles between consecutive points, summing to the angle between the endpoints.
    steps = torch.arccos((path[1:] * path[:-1]).sum(-1).clamp(-1, 1))
    total = torch.arccos((a * b).sum())
    torch.testing.assert_close(steps, torch.full((10,), float(total) / 10), atol=1e-5, rtol=0)
    # The halfway point of a 90 degree arc is the normalised sum, not the (shorter) mean.
    e0, e1 = torch.eye(2)
    torch.testing.assert_close(slerp(e0, e1, 0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_slerp_parallel_falls_back_to_lerp():
    a = unit(100, seed=3)
    for b in (a.clone(), 2 * a, a + 1e-9 * unit(100, seed=4), -a):
        out = slerp(a, b, 0.25)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, 0.75 * a + 0.25 * b)


def test_slerp_broadcasting_and_errors():
    a, b = unit(4, 1, 100, seed=5), unit(4, 1, 100, seed=6)
    out = slerp(a.expand(4, 7, 100), b.expand(4, 7, 100), torch.linspace(0, 1, 7).view(1, 7))
    assert out.shape == (4, 7, 100) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], a[:, 0])
    torch.testing.assert_close(out[:, -1], b[:, 0])
    with pytest.raises(ValueError, match="same shape"):
        slerp(torch.zeros(3), torch.zeros(4), 0.5)


def test_interpolation_latents_shapes_and_determinism():
    z = interpolation_latents(rows=3, steps=5, nz=100, seed=7)
    assert z.shape == (15, 100) and z.dtype == torch.float32
    torch.testing.assert_close(z, interpolation_latents(3, 5, 100, seed=7), rtol=0, atol=0)
    assert not torch.equal(z, interpolation_latents(3, 5, 100, seed=8))
    rows = z.view(3, 5, 100)
    # Each row is its own walk: different endpoints, and every point lies between them.
    assert not torch.allclose(rows[0, 0], rows[1, 0])
    for r in rows:
        cos = torch.nn.functional.cosine_similarity(r[1:-1], r[0].expand(3, 100))
        assert (cos > torch.nn.functional.cosine_similarity(r[-1:], r[:1])).all()
    with pytest.raises(ValueError, match="steps >= 2"):
        interpolation_latents(2, 1, 100, 0)
