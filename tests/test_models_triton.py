"""Generator / Discriminator with backend="triton" (the chained fused network) against the
reference backend in float64: outputs, running stats, num_batches_tracked and all gradients.

CPU (Triton interpreter): tiny widths (nz=8, ngf=ndf=4) at the real 64x64 resolution, fp32 ieee.
CUDA: full DCGAN widths in fp32 (TF32) and bf16.
"""
import copy

import pytest
import torch

from fastdcgan import Discriminator, Generator
from fastdcgan.kernels import block, implicit_gemm, weights
from precision import (
    allowed, DEV, eager_precision, FEEDS, interpreter_only, needs_cuda, rel_err, use_feed)

pytestmark = pytest.mark.usefixtures("poison")


def pair(nz, ngf, ndf, dtype=torch.float32):
    """(triton G, D in dtype), (float64 reference G, D), (float32 eager G, D: the baseline)."""
    torch.manual_seed(0)
    g = Generator(nz=nz, ngf=ngf, backend="reference").to(DEV)
    d = Discriminator(ndf=ndf, backend="reference").to(DEV)
    ref = [copy.deepcopy(m).double() for m in (g, d)]
    eager = [copy.deepcopy(m) for m in (g, d)]
    ours = [m.to(dtype).set_backend("triton") for m in (g, d)]
    return ours, ref, eager


def compare_state(m, mr, me, tol):
    for (name, a), (_, b), (_, c) in zip(m.named_parameters(), mr.named_parameters(), me.named_parameters()):
        assert a.grad is not None, name
        assert rel_err(a.grad, b.grad) < allowed(tol, c.grad, b.grad), f"grad {name}"
    for (name, a), (_, b), (_, c) in zip(m.named_buffers(), mr.named_buffers(), me.named_buffers()):
        if a.is_floating_point():
            assert rel_err(a, b) < allowed(tol, c, b), name
        else:
            assert torch.equal(a.cpu(), b.cpu()), name


def train_step_check(nz, ngf, ndf, batch, dtype, tol):
    """One G -> D forward (training BN) and backward through both, as in a G step; each quantity
    within tol or twice eager PyTorch's error at the same precision."""
    (g, d), (gr, dr), (ge, de) = pair(nz, ngf, ndf, dtype)
    z = torch.randn(batch, nz, device=DEV)
    w = torch.randn(batch, device=DEV)
    fake, fake_r = g(z.to(dtype)), gr(z.double())
    with eager_precision(dtype, DEV):
        fake_e = ge(z)
        p_e = de(fake_e)
    (p_e.float() * w).sum().backward()
    assert fake.shape == (batch, 3, 64, 64) and fake.dtype == dtype
    assert rel_err(fake, fake_r) < allowed(tol, fake_e, fake_r)
    p, p_r = d(fake), dr(fake_r)
    assert p.shape == (batch,)
    assert rel_err(p, p_r) < allowed(tol, p_e, p_r)
    (p.float() * w).sum().backward()
    (p_r * w.double()).sum().backward()
    compare_state(g, gr, ge, tol)
    compare_state(d, dr, de, tol)


def record_forward_gemms(monkeypatch):
    """What the chained forward's GEMMs are given: the producer transforms (`pro`) of the
    BatchNorm blocks' GEMMs, and whether the other blocks' GEMMs store their raw output."""
    prologues, stores_y = [], []

    def conv_gemm(x, *args, pro=None, **kwargs):
        if kwargs.get("stats") == 1:
            prologues.append(pro)
        elif not kwargs.get("w_t"):
            stores_y.append(kwargs.get("store_y", True))
        return implicit_gemm.conv_gemm(x, *args, pro=pro, **kwargs)

    monkeypatch.setattr(block, "conv_gemm", conv_gemm)
    return prologues, stores_y


@interpreter_only
@pytest.mark.parametrize("feed", list(FEEDS))
def test_train_step_matches_reference(feed, monkeypatch):
    """Every way of feeding the GEMMs: the producer's BN + activation (forward) and the BN /
    activation backward (dy) written out once per block (the default) or applied in the
    consuming GEMMs' prologues (FASTDCGAN_MATERIALIZE_ACT=0 / FASTDCGAN_MATERIALIZE_DY=0)."""
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    use_feed(feed, monkeypatch)
    materialize_act = FEEDS[feed][0]
    prologues, stores_y = record_forward_gemms(monkeypatch)
    train_step_check(nz=8, ngf=4, ndf=4, batch=2, dtype=torch.float32, tol=5e-5)
    # the BatchNorm blocks' forward GEMMs: G's first four, D's middle three; all but G's first
    # (reading z) read a producer's output, raw or through its transform
    assert len(prologues) == 7
    assert sum(p is None for p in prologues) == (7 if materialize_act == "1" else 1)
    # the others: G's last (its output y is the backward's) and D's first, whose LeakyReLU'
    # reads the same off its activation, so with that materialized y is not stored
    assert stores_y == [True, materialize_act == "0"]


def eval_check(nz, ngf, ndf, batch, dtype, tol, discriminator=True):
    """Eval-mode (running-stats BN, no grad) outputs of G (and D, D.logits)."""
    (g, d), (gr, dr), _ = pair(nz, ngf, ndf, dtype)
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
@pytest.mark.parametrize("feed", ["prologues", "both-materialized"])   # the two extremes
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 3e-2), (torch.bfloat16, 1e-1)], ids=["tf32", "bf16"])
def test_full_size_gpu(dtype, tol, feed, monkeypatch):
    use_feed(feed, monkeypatch)
    train_step_check(nz=100, ngf=64, ndf=64, batch=32, dtype=dtype, tol=tol)
    # G's eval kernels are the ones the inference benchmark uses; D's eval is checked on the CPU
    eval_check(nz=100, ngf=64, ndf=64, batch=32, dtype=dtype, tol=tol, discriminator=False)


@needs_cuda
def test_autocast_bf16_gpu():
    """Under torch.autocast(bf16) (what the trainer's --precision bf16 uses) the fused network
    runs in bf16 on fp32 parameters: bf16 outputs, fp32 gradients, fp32 running stats."""
    (g, d), (gr, dr), (ge, de) = pair(100, 64, 64)
    z, w = torch.randn(32, 100, device=DEV), torch.randn(32, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fake = g(z)
        p = d(fake)
        fake_e = ge(z)
        p_e = de(fake_e)
    assert fake.dtype == torch.bfloat16 and p.dtype == torch.bfloat16
    fake_r = gr(z.double())
    p_r = dr(fake_r)
    assert rel_err(fake, fake_r) < allowed(1e-1, fake_e, fake_r)
    assert rel_err(p, p_r) < allowed(1e-1, p_e, p_r)
    (p.float() * w).sum().backward()
    (p_e.float() * w).sum().backward()
    (p_r * w.double()).sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in (*g.parameters(), *d.parameters()))
    compare_state(g, gr, ge, 1e-1)
    compare_state(d, dr, de, 1e-1)


def _sinked_backward(nz, ngf, ndf, batch, dtype=torch.float32):
    """G -> D forward and backward inside a training step's scope, every parameter's .grad a
    zero buffer beforehand (as FusedAdam's are), so the kernels accumulate into it; the grads."""
    (g, d), _, _ = pair(nz, ngf, ndf)
    g, d = g.use_kernel_layout(), d.use_kernel_layout()   # the sinks must be in kernel layout
    params = [*g.parameters(), *d.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    torch.manual_seed(1)
    z, w = torch.randn(batch, nz, device=DEV), torch.randn(batch, device=DEV)
    with weights.training_step(), torch.autocast(DEV, torch.bfloat16, enabled=dtype == torch.bfloat16):
        (d(g(z)).float() * w).sum().backward()
    return [p.grad.clone() for p in params]


@interpreter_only
def test_weight_gradients_go_through_the_wgrad_stream(monkeypatch):
    """FASTDCGAN_WGRAD_STREAM's plumbing, with a stand-in stream that runs each launch at once:
    every weight gradient of the two backwards (G's and D's) is launched on it, after its
    block's data gradient, and each backward joins it once, after its last launch; the
    gradients are the one-stream path's."""
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    want = _sinked_backward(8, 4, 4, 3)
    log = []

    class Stream:
        def launch(self, fn, *reads):
            log.append("launch")
            fn()

        def join(self):
            log.append("join")

    monkeypatch.setattr(block.WgradStream, "for_tensor", classmethod(lambda cls, t: Stream()))
    for name in ("conv_gemm", "conv_wgrad"):
        def record(*args, _name=name, _fn=getattr(block, name), **kw):
            log.append(_name)
            return _fn(*args, **kw)
        monkeypatch.setattr(block, name, record)
    got = _sinked_backward(8, 4, 4, 3)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    backward = log[log.index("launch") - 1:]   # from the first backward GEMM
    assert backward.count("join") == 2 and backward[-1] == "join"
    assert backward.count("launch") == backward.count("conv_wgrad") == 10
    launches = [i for i, event in enumerate(backward) if event == "launch"]
    assert all(backward[i + 1] == "conv_wgrad" for i in launches)
    # each after its block's data gradient: all of D's 5 (G's output wants a gradient) and 4 of
    # G's (not into z, a leaf without grad)
    assert [backward[i - 1] for i in launches].count("conv_gemm") == 9


@needs_cuda
@pytest.mark.parametrize("feed", ["prologues", "both-materialized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tf32", "bf16"])
def test_weight_gradients_on_a_side_stream_gpu(dtype, feed, monkeypatch):
    """FASTDCGAN_WGRAD_STREAM=1 (kernels/block.py): in a training step's scope, where the weight
    gradients go into the parameters' .grad, they run on a second stream. A G -> D backward then
    gives the one-stream gradients up to the split-K atomics' order. Outputs are NaN-poisoned
    when allocated: an input of a side-stream launch freed and reused too early reads as NaN."""
    use_feed(feed, monkeypatch)
    grads = {}
    for on in ("0", "1"):
        monkeypatch.setenv("FASTDCGAN_WGRAD_STREAM", on)
        grads[on] = _sinked_backward(100, 64, 64, 32, dtype)
    for i, (a, b) in enumerate(zip(grads["0"], grads["1"])):
        assert rel_err(b, a) < 1e-4, i
