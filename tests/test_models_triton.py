"""Generator / Discriminator with backend="triton" (the chained fused network) against the
reference backend in float64: outputs, running stats, num_batches_tracked and all gradients.

CPU (Triton interpreter): tiny widths (nz=8, ngf=ndf=4) at the real 64x64 resolution, fp32 ieee.
CUDA: full DCGAN widths in fp32 (TF32) and bf16.
"""
import copy

import pytest
import torch

from fastdcgan import Discriminator, Generator

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# tiny-shape tests run under the interpreter only: on a GPU every new shape class is a kernel
# compile of seconds, and the GPU runs the full-size cases instead
interpreter_only = pytest.mark.skipif(CUDA, reason="tiny-shape interpreter test; the GPU runs full sizes")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FASTDCGAN_POISON", "1")


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(out).any(), "NaN in the result"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def pair(nz, ngf, ndf, dtype=torch.float32):
    torch.manual_seed(0)
    g = Generator(nz=nz, ngf=ngf, backend="triton").to(DEV, dtype)
    d = Discriminator(ndf=ndf, backend="triton").to(DEV, dtype)
    gr = copy.deepcopy(g).double().set_backend("reference")
    dr = copy.deepcopy(d).double().set_backend("reference")
    return g, d, gr, dr


def compare_state(m, mr, tol):
    for (name, a), (_, b) in zip(m.named_parameters(), mr.named_parameters()):
        assert a.grad is not None, name
        assert rel_err(a.grad, b.grad) < tol, f"grad {name}"
    for (name, a), (_, b) in zip(m.named_buffers(), mr.named_buffers()):
        if a.is_floating_point():
            assert rel_err(a, b) < tol, name
        else:
            assert torch.equal(a.cpu(), b.cpu()), name


def train_step_check(nz, ngf, ndf, batch, dtype, tol):
    """One G -> D forward (training BN) and backward through both, as in a G step."""
    g, d, gr, dr = pair(nz, ngf, ndf, dtype)
    z = torch.randn(batch, nz, device=DEV)
    fake, fake_r = g(z.to(dtype)), gr(z.double())
    assert fake.shape == (batch, 3, 64, 64) and fake.dtype == dtype
    assert rel_err(fake, fake_r) < tol
    p, p_r = d(fake), dr(fake_r)
    assert p.shape == (batch,)
    assert rel_err(p, p_r) < tol
    w = torch.randn(batch, device=DEV)
    (p.float() * w).sum().backward()
    (p_r * w.double()).sum().backward()
    compare_state(g, gr, tol)
    compare_state(d, dr, tol)


@interpreter_only
def test_train_step_matches_reference(monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    train_step_check(nz=8, ngf=4, ndf=4, batch=2, dtype=torch.float32, tol=5e-5)


def eval_check(nz, ngf, ndf, batch, dtype, tol, discriminator=True):
    """Eval-mode (running-stats BN, no grad) outputs of G (and D, D.logits)."""
    g, d, gr, dr = pair(nz, ngf, ndf, dtype)
    z = torch.randn(batch, nz, 1, 1, device=DEV)
    # running stats = one batch's statistics (momentum 1), so eval-mode BN is well conditioned
    for m in (*g.modules(), *d.modules(), *gr.modules(), *dr.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        img, img_r = g(z.to(dtype)), gr(z.double())
        d(img), dr(img_r)
    for m in (g, d, gr, dr):
        m.eval()
    with torch.no_grad():
        img, img_r = g(z.to(dtype)), gr(z.double())
        assert rel_err(img, img_r) < tol
        if discriminator:
            assert rel_err(d(img), dr(img_r)) < tol
            assert rel_err(d.logits(img), dr.logits(img_r)) < tol
    for (name, a), (_, b) in zip((*g.named_buffers(), *d.named_buffers()),
                                 (*gr.named_buffers(), *dr.named_buffers())):
        if a.is_floating_point():
            assert rel_err(a, b) < tol, name


@interpreter_only
def test_eval_and_logits_match_reference(monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    eval_check(nz=8, ngf=4, ndf=4, batch=3, dtype=torch.float32, tol=5e-5)


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 3e-2), (torch.bfloat16, 1e-1)], ids=["tf32", "bf16"])
def test_full_size_gpu(dtype, tol):
    train_step_check(nz=100, ngf=64, ndf=64, batch=32, dtype=dtype, tol=tol)
    # G's eval kernels are the ones the inference benchmark uses; D's eval is checked on the CPU
    eval_check(nz=100, ngf=64, ndf=64, batch=32, dtype=dtype, tol=tol, discriminator=False)


@needs_cuda
def test_autocast_bf16_gpu():
    """Under torch.autocast(bf16) (what the trainer's --precision bf16 uses) the fused network
    runs in bf16 on fp32 parameters: bf16 outputs, fp32 gradients, fp32 running stats."""
    g, d, gr, dr = pair(100, 64, 64)
    z = torch.randn(32, 100, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fake = g(z)
        p = d(fake)
    assert fake.dtype == torch.bfloat16 and p.dtype == torch.bfloat16
    fake_r = gr(z.double())
    p_r = dr(fake_r)
    assert rel_err(fake, fake_r) < 1e-1 and rel_err(p, p_r) < 1e-1
    w = torch.randn(32, device=DEV)
    (p.float() * w).sum().backward()
    (p_r * w.double()).sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in (*g.parameters(), *d.parameters()))
    compare_state(g, gr, 1e-1)
    compare_state(d, dr, 1e-1)
