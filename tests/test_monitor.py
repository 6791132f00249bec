import math
import random

import pytest
import torch

from fastdcgan.data.synthetic import render_faces
from fastdcgan.monitor import (DiscriminatorWinsDetector, DivergenceDetector, ModeCollapseDetector,
                               NonFiniteError, StabilityMonitor, sample_diversity)


def faces(n, seed):
    return torch.from_numpy(render_faces(n, seed=seed)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def real():
    return faces(64, seed=0)


def healthy(step, rng):
    """Loss values of a DCGAN that trains normally: D and G trade blows."""
    return (0.4 + rng.random(), 1.0 + 2 * rng.random(), 0.5 + 0.3 * rng.random(),
            0.2 + 0.2 * rng.random())


def d_wins(step, rng):
    return (0.005 + 0.01 * rng.random(), 8 + rng.random(), 0.998, 0.001 + 0.002 * rng.random())


def run(monitor, phases):
    """Feeds (num_steps, source) phases; returns [(step, message)] of everything emitted."""
    rng, out, step = random.Random(0), [], 0
    for n, source in phases:
        for _ in range(n):
            out += [(step, m) for m in monitor.update(step, *source(step, rng))]
            step += 1
    return out


def test_healthy_run_is_quiet(real):
    monitor = StabilityMonitor()
    assert run(monitor, [(2000, healthy)]) == []
    assert monitor.check_samples(1000, faces(64, seed=5), real) == []
    assert monitor.history == []


def test_discriminator_winning_fires_once_per_window():
    monitor = StabilityMonitor(window=100)
    out = run(monitor, [(300, healthy), (450, d_wins)])
    # The window mean drops below the thresholds a few dozen steps into the bad phase, then the
    # warning repeats once per 100 steps while it lasts.
    assert 300 < out[0][0] < 400
    assert len(out) >= 3 and [s - out[0][0] for s, _ in out] == [100 * i for i in range(len(out))]
    step, msg = out[0]
    assert msg.startswith(f"step {step}: discriminator is winning outright: D loss ")
    assert "mean of last 100 steps" in msg and "D(G(z))" in msg
    assert [k for _, k, _ in monitor.history] == ["d_wins"] * len(out)


def test_discriminator_detector_needs_a_full_window():
    det = DiscriminatorWinsDetector(window=50)
    assert all(det.update(i, 0.001, 1.0, 0.0) is None for i in range(49))
    assert "step 49" in det.update(49, 0.001, 1.0, 0.0)
    # D loss low but D(G(z)) healthy: not "winning outright".
    det = DiscriminatorWinsDetector(window=10)
    assert all(det.update(i, 0.01, 0.99, 0.3) is None for i in range(30))


@pytest.mark.parametrize("field", range(4))
@pytest.mark.parametrize("bad", [math.nan, math.inf, torch.tensor(-math.inf)])
def test_non_finite_raises(field, bad):
    monitor = StabilityMonitor()
    run(monitor, [(10, healthy)])
    values = [0.7, 1.5, 0.6, 0.3]
    values[field] = bad
    with pytest.raises(NonFiniteError, match=r"^step 10: training diverged: non-finite") as e:
        monitor.update(10, *values)
    assert e.value.step == 10
    assert monitor.history[-1][:2] == (10, "non_finite")


def test_exploding_generator_loss():
    det = DivergenceDetector(window=20, g_loss_max=20.0)
    assert all(det.update(i, 0.5, 3.0, 0.6, 0.3) is None for i in range(50))
    msgs = [det.update(50 + i, 0.5, 80.0, 0.6, 0.3) for i in range(20)]
    fired = [i for i, m in enumerate(msgs) if m]
    assert fired and "generator loss is exploding" in msgs[fired[0]]
    assert msgs[fired[0]].startswith(f"step {50 + fired[0]}:")


def test_sample_diversity():
    x = torch.rand(8, 3, 16, 16)
    pw, nn = sample_diversity(x)
    assert pw >= nn > 0
    assert sample_diversity(x[:1].repeat(8, 1, 1, 1)) == pytest.approx((0, 0), abs=1e-6)
    two = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    assert sample_diversity(two) == pytest.approx((1.0, 1.0))  # RMS pixel distance
    with pytest.raises(ValueError, match="at least 2"):
        sample_diversity(x[:1])


def test_mode_collapse_full_and_partial(real):
    det = ModeCollapseDetector()
    assert det.check(100, faces(64, seed=7), real) is None
    jitter = 0.02 * torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    one_face = (faces(1, seed=3).repeat(64, 1, 1, 1) + jitter).clamp(-1, 1)
    msg = det.check(200, one_face)  # the real set given before is reused
    assert msg.startswith("step 200: possible mode collapse")
    # Eight repeated faces: the pairwise spread stays high, nearest neighbours give it away.
    few_modes = faces(8, seed=9).repeat(8, 1, 1, 1)
    assert "nearest-neighbour distance" in det.check(300, few_modes)
    with pytest.raises(ValueError, match="at least as many"):
        ModeCollapseDetector().check(0, one_face, real[:10])
    with pytest.raises(ValueError, match="real samples"):
        ModeCollapseDetector().check(0, one_face)


def test_monitor_sample_checks_warmup_and_cooldown(real):
    monitor = StabilityMonitor(window=100, warmup=500)
    collapsed = faces(1, seed=3).repeat(64, 1, 1, 1)
    assert monitor.check_samples(0, collapsed, real) == []  # warmup, but real is kept
    assert len(monitor.check_samples(500, collapsed)) == 1
    assert monitor.check_samples(550, collapsed) == []      # within the cooldown
    assert len(monitor.check_samples(600, collapsed)) == 1
    assert [(s, k) for s, k, _ in monitor.history] == [(500, "mode_collapse"), (600, "mode_collapse")]
