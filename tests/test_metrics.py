import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch

from fastdcgan import metrics
from fastdcgan.data.synthetic import render_faces

FAST = dict(patches_per_image=16, num_projections=32, num_repeats=2)


def faces(n, seed):
    u8 = torch.from_numpy(render_faces(n, seed=seed))
    return u8.permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def real():
    return faces(128, seed=0)


@pytest.fixture(scope="module")
def noise():
    return torch.rand(128, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ---------------------------------------------------------------------------------------------
# SWD


def _progan_pyramid(x, levels):
    """The ProGAN reference formulation (scipy.ndimage, mirror borders), in float64."""
    g = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1])[None, None] / 256.0

    def down(a):
        return scipy.ndimage.convolve(a, g, mode="mirror")[:, :, ::2, ::2]

    def up(a):
        z = np.zeros(a.shape[:2] + (a.shape[2] * 2, a.shape[3] * 2))
        z[:, :, ::2, ::2] = a
        return scipy.ndimage.convolve(z, g * 4, mode="mirror")

    pyr = [x]
    for _ in range(1, levels):
        pyr.append(down(pyr[-1]))
        pyr[-2] = pyr[-2] - up(pyr[-1])
    return pyr


def test_laplacian_pyramid_matches_progan_reference(real):
    x = real[:4].double()
    ours = metrics._laplacian_pyramid(x, 3)
    ref = _progan_pyramid(x.numpy(), 3)
    assert [tuple(l.shape[2:]) for l in ours] == [(64, 64), (32, 32), (16, 16)]
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-12)


def test_swd_levels_and_determinism(real, noise):
    r1 = metrics.swd(real, noise, seed=3, **FAST)
    r2 = metrics.swd(real, noise, seed=3, **FAST)
    assert list(r1) == ["swd_64", "swd_32", "swd_16", "swd_avg"]
    assert r1 == r2
    assert r1["swd_avg"] == pytest.approx(np.mean([r1["swd_64"], r1["swd_32"], r1["swd_16"]]))
    assert metrics.swd(real, noise, seed=4, **FAST) != r1


def test_swd_self_halves_noise(real, noise):
    self_ = metrics.swd(real, real, **FAST)
    assert all(v < 1e-6 for v in self_.values())
    halves = metrics.swd(real[:64], real[64:], **FAST)
    far = metrics.swd(real[:64], noise[:64], **FAST)
    # 64 images per side leave a sampling floor of ~60 (x1e3); noise is ~4x that at every level.
    assert far["swd_avg"] > 3 * halves["swd_avg"], (halves, far)
    for k in halves:
        assert far[k] > 2 * halves[k], (k, halves, far)


def test_swd_unequal_sizes_and_min_resolution(real):
    r = metrics.swd(real[:40], real[40:], **FAST)  # 40 vs 88 images: equal patch counts
    assert r["swd_avg"] > 0
    two = metrics.swd(real[:40], real[40:], min_resolution=32, **FAST)
    assert list(two) == ["swd_64", "swd_32", "swd_avg"]


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, 1, 64, 64), r"\(N, 3, H, W\)"),
    (torch.zeros(3, 64, 64), r"\(N, 3, H, W\)"),
    (torch.zeros(4, 3, 64, 64, dtype=torch.uint8), "floating point"),
    (torch.full((4, 3, 64, 64), 2.0), r"\[-1, 1\]"),
    (torch.full((4, 3, 64, 64), float("nan")), "NaN"),
    (torch.zeros(4, 3, 32, 32), "sizes differ"),
])
def test_swd_rejects_bad_inputs(real, bad, match):
    with pytest.raises(ValueError, match=match):
        metrics.swd(real[:4], bad)


def test_swd_rejects_bad_sizes_and_args():
    with pytest.raises(ValueError, match="min_resolution"):
        metrics.swd(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        metrics.swd(torch.zeros(2, 3, 66, 66), torch.zeros(2, 3, 66, 66))
    with pytest.raises(ValueError, match="patches_per_image"):
        metrics.swd(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64), patches_per_image=0)
    with pytest.raises(TypeError):
        metrics.swd(np.zeros((2, 3, 64, 64)), torch.zeros(2, 3, 64, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swd_cuda_matches_cpu(real, noise):
    cpu = metrics.swd(real[:64], noise[:64], **FAST)
    gpu = metrics.swd(real[:64].cuda(), noise[:64].cuda(), **FAST)
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def _reference_fd(mu1, s1, mu2, s2):
    """Tr sqrtm(S1 S2) as the sum of sqrt eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric PSD)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum()


def _stats(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift
    return metrics.feature_statistics(f)


@pytest.mark.parametrize("n", [500, 12])  # 12 samples in 32-D: singular covariances
def test_frechet_distance_matches_reference(n):
    mu1, s1 = _stats(n, 32, 0)
    mu2, s2 = _stats(n, 32, 1, shift=0.5)
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-4)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6 * np.trace(s1))


def test_frechet_distance_falls_back_to_eps_offset(monkeypatch):
    """A non-finite or wrong root (what sqrtm gives on some near-singular products) is retaken
    with eps added to both diagonals."""
    mu1, s1 = _stats(12, 32, 0)
    mu2, s2 = _stats(12, 32, 1, shift=0.5)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
    ours = metrics.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(32)) @ (s2 + 1e-6 * np.eye(32)))
    assert ours == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-4)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: np.full_like(a, np.nan))
    with pytest.raises(ValueError, match="eps offset"):
        metrics.frechet_distance(mu1, s1, mu2, s2)


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.feature_statistics(np.zeros((1, 5)))


# ---------------------------------------------------------------------------------------------
# FID with a user-supplied TorchScript network


class TinyFeatures(torch.nn.Module):
    """Plain feature extractor: float images in [-1, 1] -> (N, 16)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class StyleGANLike(torch.nn.Module):
    """The StyleGAN2-ADA Inception's calling convention: uint8 [0, 255], return_features=True."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 8)

    def forward(self, img, return_features: bool = False):
        assert img.dtype == torch.uint8
        assert return_features
        return self.proj(img.float().mean(dim=(2, 3)) / 255.0)


def _save_scripted(module, path):
    with warnings.catch_warnings():  # torch.jit.script is deprecated in recent torch, still works
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_fid_pipeline_with_scripted_cnn(tmp_path, real, noise):
    model = metrics.load_inception(_save_scripted(TinyFeatures(), tmp_path / "tiny.pt"))
    assert (model.input_format, model.return_features) == ("float", False)
    feats = metrics.inception_features(model, real[:10], batch_size=4)
    assert feats.shape == (10, 16) and feats.dtype == np.float64
    assert metrics.fid(real, real, model) == pytest.approx(0, abs=1e-6)
    halves = metrics.fid(real[:64], real[64:], model)
    far = metrics.fid(real[:64], noise[:64], model)
    assert 0 < halves < far / 5


def test_load_inception_detects_return_features(tmp_path, real):
    path = _save_scripted(StyleGANLike(), tmp_path / "inception.pt")
    model = metrics.load_inception(path)
    assert (model.input_format, model.return_features) == ("uint8", True)
    assert metrics.inception_features(model, real[:6], batch_size=4).shape == (6, 8)
    forced = metrics.load_inception(_save_scripted(TinyFeatures(), tmp_path / "t.pt"), input_format="uint8")
    assert forced.input_format == "uint8"


def test_load_inception_errors(tmp_path):
    for path in (None, tmp_path / "missing.pt"):
        with pytest.raises(FileNotFoundError) as e:
            metrics.load_inception(path)
        assert metrics.INCEPTION_URL in str(e.value) and "--inception" in str(e.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="TorchScript"):
        metrics.load_inception(junk)
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        metrics.fid(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64), None)


# ---------------------------------------------------------------------------------------------
# python -m fastdcgan.evaluate


@pytest.fixture
def small_checkpoint(tmp_path):
    from fastdcgan.models import Generator

    path = tmp_path / "netG.pth"
    torch.save(Generator(ngf=8, backend="reference").state_dict(), path)  # a pytorch/examples netG
    return path


def test_evaluate_cli_writes_table_and_json(tmp_path, monkeypatch, capsys, real, small_checkpoint):
    import json

    from fastdcgan import evaluate

    monkeypatch.setattr(evaluate, "load_real", lambda data, num, seed=0, device="cpu": real[:num])
    inception = _save_scripted(TinyFeatures(), tmp_path / "tiny.pt")
    out = tmp_path / "eval" / "scores.json"
    argv = ["--checkpoint", str(small_checkpoint), "--num", "32", "--device", "cpu",
            "--patches-per-image", "8", "--inception", str(inception), "--json", str(out)]
    assert evaluate.main(argv) == 0
    text = capsys.readouterr().out
    assert "SWD x1e3 64 px" in text and "SWD x1e3 avg" in text and "FID" in text
    record = json.loads(out.read_text())
    assert record["num_fake"] == record["num_real"] == 32 and record["fid"] > 0
    assert set(record) >= {"swd_64", "swd_32", "swd_16", "swd_avg", "checkpoint", "seed"}
    assert evaluate.main(argv[:-2]) == 0  # same seed, same numbers
    assert f"{record['swd_avg']:10.3f}" in capsys.readouterr().out


def test_evaluate_cli_errors(tmp_path, capsys, small_checkpoint):
    from fastdcgan import evaluate

    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pth")]) == 1
    assert "not found" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(small_checkpoint), "--inception",
                          str(tmp_path / "nope.pt")]) == 1
    assert metrics.INCEPTION_URL in capsys.readouterr().err
