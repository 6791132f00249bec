"""python -m fastdcgan.generate and checkpoint loading: ours, pytorch/examples files, bad files."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastdcgan import Discriminator, Generator, checkpoint, generate
from fastdcgan.checkpoint import CheckpointError, load_generator
from precision import needs_cuda


def _tiny_g():
    torch.manual_seed(0)
    return Generator(nz=16, ngf=8, backend="reference")


def test_bare_example_state_dict_generates_like_the_model(tmp_path):
    G = _tiny_g()
    G(torch.randn(4, 16))  # move the running stats off their init
    path = tmp_path / "netG_epoch_24.pth"
    torch.save(G.state_dict(), path)
    loaded = load_generator(path, backend="reference")
    assert (loaded.nz, loaded.ngf, loaded.nc) == (16, 8, 3) and not loaded.training
    G.eval()
    torch.testing.assert_close(generate.generate(loaded, 6, seed=3), generate.generate(G, 6, seed=3))
    # DataParallel checkpoints carry a "module." prefix
    torch.save({"module." + k: v for k, v in G.state_dict().items()}, path)
    assert load_generator(path).nz == 16


def test_generate_is_deterministic_and_train_bn_differs():
    G = _tiny_g()
    G(torch.randn(8, 16)).sum()  # running stats != batch stats
    a, b = generate.generate(G, 5, seed=1), generate.generate(G, 5, seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, generate.generate(G, 5, seed=2))
    assert not torch.allclose(a, generate.generate(G, 5, seed=1, train_bn=True))
    assert a.shape == (5, 3, 64, 64) and a.min() >= -1 and a.max() <= 1


def test_cli_writes_a_grid_from_a_training_checkpoint(tmp_path, capsys):
    G = _tiny_g()
    D = Discriminator(ndf=8, backend="reference")
    ckpt = tmp_path / "checkpoint.pt"
    checkpoint.save(ckpt, {"netG": G.state_dict(), "netD": D.state_dict()})
    out = tmp_path / "grid.png"
    assert generate.main(["--checkpoint", str(ckpt), "--num", "10", "--nrow", "5", "--out", str(out),
                          "--device", "cpu"]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (2 * 66 + 2, 5 * 66 + 2, 3)
    assert img.std() > 1  # not a blank image


def test_cli_no_cuda_graph_flag(tmp_path):
    path = tmp_path / "netG.pth"
    torch.save(_tiny_g().state_dict(), path)
    assert generate.main(["--checkpoint", str(path), "--num", "4", "--out", str(tmp_path / "g.png"),
                          "--device", "cpu", "--no-cuda-graph"]) == 0


def test_fixed_size_batches_drop_the_padding():
    """The captured path's batching (here over the uncaptured sampler of a CPU model): 10 latents
    in batches of 4, the last one padded, give G(z)'s images in order."""
    G = _tiny_g().eval()
    z = torch.randn(10, 16)
    out = generate._sample_captured(G, z, 4)
    with torch.no_grad():
        torch.testing.assert_close(out, G(z))
    assert generate._sample_captured(G, z, 512).shape == (10, 3, 64, 64)


@needs_cuda
def test_captured_sampling_matches_op_by_op_with_a_partial_batch():
    """100 images in graphs of 64 (the last batch padded) vs op by op in batches of 64 and 36:
    the same images (up to the summation order of the kernels' per-batch-size tiles)."""
    torch.manual_seed(0)
    G = Generator(backend="triton").cuda()
    G(torch.randn(64, 100, device="cuda"))  # move the running stats off their init
    a = generate.generate(G, 100, seed=3, batch_size=64)
    b = generate.generate(G, 100, seed=3, batch_size=64, cuda_graph=False)
    assert a.shape == (100, 3, 64, 64) and G.training
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    torch.testing.assert_close(a[:64], b[:64], rtol=0, atol=0)  # same batch size, same kernels


@pytest.mark.parametrize("content, match", [
    (b"", "corrupt or not a PyTorch checkpoint"),
    (b"\x80\x04this is not a pickle at all", "corrupt or not a PyTorch checkpoint"),
    ("text", "corrupt or not a PyTorch checkpoint"),
])
def test_corrupt_files_get_a_clear_error(tmp_path, content, match, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(content if isinstance(content, bytes) else b"hello, world\n")
    with pytest.raises(CheckpointError, match=match):
        load_generator(path)
    assert generate.main(["--checkpoint", str(path), "--out", str(tmp_path / "x.png")]) == 1
    assert "corrupt" in capsys.readouterr().err


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"netG": _tiny_g().state_dict()})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_generator(path)


def test_foreign_checkpoints_are_refused(tmp_path):
    path = tmp_path / "d.pth"
    torch.save(Discriminator(ndf=8).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a DCGAN generator|no DCGAN generator"):
        load_generator(path)
    torch.save({"fc.weight": torch.randn(3, 3)}, path)
    with pytest.raises(CheckpointError, match="no DCGAN generator weights"):
        load_generator(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="neither a fastdcgan checkpoint"):
        load_generator(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_generator(tmp_path / "missing.pt")


def test_resume_refuses_a_bare_generator(tmp_path):
    path = tmp_path / "netG.pth"
    torch.save(_tiny_g().state_dict(), path)
    with pytest.raises(CheckpointError, match="bare generator state_dict"):
        checkpoint.load_training(path)


def test_unsafe_pickles_are_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"netG": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_generator(path)


def test_cli_interpolate_writes_slerp_rows(tmp_path):
    G = _tiny_g()
    path = tmp_path / "netG.pth"
    torch.save(G.state_dict(), path)
    out = tmp_path / "walk.png"
    assert generate.main(["--checkpoint", str(path), "--interpolate", "3", "--nrow", "5",
                          "--out", str(out), "--device", "cpu"]) == 0
    img = np.asarray(Image.open(out)).astype(float)
    assert img.shape == (3 * 66 + 2, 5 * 66 + 2, 3)
    tile = lambda r, c: img[2 + 66 * r: 66 * r + 66, 2 + 66 * c: 66 * c + 66]
    # neighbours along a walk are closer than the walk's two ends
    assert np.abs(tile(0, 0) - tile(0, 1)).mean() < np.abs(tile(0, 0) - tile(0, 4)).mean()
