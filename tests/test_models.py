"""The reference backend is the pytorch/examples DCGAN: same keys, shapes, init and outputs."""
import pytest
import torch
from torch import nn

from fastdcgan import Discriminator, Generator


class ExampleGenerator(nn.Module):
    """pytorch/examples dcgan/main.py's Generator, as written there (ngpu dropped)."""

    def __init__(self, nz=100, ngf=64, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, x):
        return self.main(x)


class ExampleDiscriminator(nn.Module):
    def __init__(self, nc=3, ndf=64):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x):
        return self.main(x).view(-1, 1).squeeze(1)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k


def test_full_size_parameter_counts_and_keys():
    G, D = Generator(backend="reference"), Discriminator(backend="reference")
    assert sum(p.numel() for p in G.parameters()) == 3_576_704
    assert sum(p.numel() for p in D.parameters()) == 2_765_568
    _same_state(G, ExampleGenerator())
    _same_state(D, ExampleDiscriminator())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_example_weights_load_and_give_the_same_output(mode):
    torch.manual_seed(1)
    ex_g, ex_d = ExampleGenerator(nz=20, ngf=8), ExampleDiscriminator(ndf=8)
    for m in (ex_g, ex_d):  # non-trivial running stats, as in a trained netG_epoch_N.pth
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2)
                bn.weight.data.normal_(1, 0.1)
                bn.bias.data.normal_(0, 0.1)
    G, D = Generator(nz=20, ngf=8, backend="reference"), Discriminator(ndf=8, backend="reference")
    G.load_state_dict(ex_g.state_dict())
    D.load_state_dict(ex_d.state_dict())
    for m in (ex_g, ex_d, G, D):
        m.train(mode == "train")
    z = torch.randn(5, 20, 1, 1)
    img = G(z)
    torch.testing.assert_close(img, ex_g(z), rtol=0, atol=0)
    torch.testing.assert_close(G(z.flatten(1)), img, rtol=0, atol=0)
    torch.testing.assert_close(D(img), ex_d(img), rtol=0, atol=0)
    assert img.shape == (5, 3, 64, 64) and D(img).shape == (5,)
    torch.testing.assert_close(torch.sigmoid(D.logits(img)), D(img))


def test_init_follows_the_example():
    torch.manual_seed(0)
    G = Generator(backend="reference")
    w = G.main[3].weight
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = G.main[4]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and abs(bn.weight.std().item() - 0.02) < 0.01
    assert torch.all(bn.bias == 0)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        Generator(backend="cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        Discriminator().set_backend("fast")


@pytest.mark.parametrize("bad, match", [
    (torch.randn(2, 3, 32, 32), "64x64"),
    (torch.randn(2, 1, 64, 64), r"\(B, 3, H, W\)"),
    (torch.randn(3, 64, 64), r"\(B, 3, H, W\)"),
    (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), "floating-point"),
])
def test_discriminator_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        Discriminator(ndf=8, backend="reference")(bad)


def test_generator_rejects_bad_latents():
    G = Generator(nz=16, ngf=8, backend="reference")
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        G(torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"\(B, 16\) or \(B, 16, 1, 1\)"):
        G(torch.randn(2, 16, 2, 2))
