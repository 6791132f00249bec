"""fastdcgan.sampler.CapturedGenerator: the uncaptured path (CPU) against G(z), its checks, and on
a GPU the CUDA-graph replay against the uncaptured triton generator, fp32 and bf16."""
import pytest
import torch

from fastdcgan import Generator
from fastdcgan.sampler import CapturedGenerator
from precision import needs_cuda

NZ = 8


def _tiny_g(seed=0):
    torch.manual_seed(seed)
    G = Generator(nz=NZ, ngf=4, backend="reference")
    G(torch.randn(4, NZ))  # move the running stats off their init
    return G.eval()


@pytest.mark.parametrize("shape", [(3, NZ), (3, NZ, 1, 1)])
def test_cpu_fallback_is_g_without_grad(shape):
    G = _tiny_g()
    sampler = CapturedGenerator(G, 3)
    assert not sampler.captured and sampler.dtype == torch.float32
    z = torch.randn(shape)
    out = sampler(z)
    with torch.no_grad():
        ref = G(z)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not G.training and G.main[1].num_batches_tracked.item() == 1  # running stats untouched


def test_train_mode_is_refused():
    G = _tiny_g().train()
    with pytest.raises(ValueError, match="eval mode"):
        CapturedGenerator(G, 2)
    G.eval().main[1].train()  # a single training-mode BN is enough
    with pytest.raises(ValueError, match="eval mode"):
        CapturedGenerator(G, 2)
    sampler = CapturedGenerator(G.eval(), 2)
    G.train()
    with pytest.raises(ValueError, match="eval mode"):
        sampler(torch.randn(2, NZ))


@pytest.mark.parametrize("z, match", [
    (torch.randn(3, NZ), r"shape \(2, 8\) or \(2, 8, 1, 1\), got \(3, 8\)"),
    (torch.randn(2, NZ + 1), r"got \(2, 9\)"),
    (torch.randn(2, NZ, 2, 2), r"got \(2, 8, 2, 2\)"),
    (torch.randn(2 * NZ), r"got \(16,\)"),
    (torch.zeros(2, NZ, dtype=torch.long), "floating-point tensor, got torch.int64"),
    (torch.randn(2, NZ, device="meta"), "latent z is on meta but the generator is on cpu"),
])
def test_bad_latents_are_refused(z, match):
    with pytest.raises(ValueError, match=match):
        CapturedGenerator(_tiny_g(), 2)(z)


def test_bad_arguments_are_refused():
    G = _tiny_g()
    with pytest.raises(TypeError, match="torch.Tensor"):
        CapturedGenerator(G, 2)([[0.0] * NZ] * 2)
    for batch in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            CapturedGenerator(G, batch)
    with pytest.raises(ValueError, match="floating-point dtype"):
        CapturedGenerator(G, 2, dtype=torch.int32)


def test_z_is_cast_to_the_buffer_dtype():
    G = _tiny_g().double()
    sampler = CapturedGenerator(G, 2)
    assert sampler.dtype == torch.float64
    z = torch.randn(2, NZ)
    with torch.no_grad():
        torch.testing.assert_close(sampler(z), G(z.double()), rtol=0, atol=0)


# -- GPU: the captured generator ---------------------------------------------------------------

def _cuda_g(dtype, seed=0):
    torch.manual_seed(seed)
    G = Generator(backend="triton").cuda()
    with torch.no_grad():  # non-trivial running statistics
        for bn in (m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2)
    return G.to(dtype).eval()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_equals_uncaptured(dtype):
    G = _cuda_g(dtype)
    sampler = CapturedGenerator(G, 64)
    assert sampler.captured and sampler.dtype == dtype
    outs = []
    for seed in (1, 2):
        z = torch.randn(64, G.nz, generator=torch.Generator().manual_seed(seed)).cuda()
        out = sampler(z)
        outs.append(sampler(z, clone=True))
        with torch.no_grad():
            ref = G(z.to(dtype))
        assert out.dtype == dtype and out.shape == (64, 3, 64, 64)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.equal(outs[0], outs[1])
    assert out.data_ptr() == sampler(z).data_ptr()  # the static output, overwritten per call


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_state_dict_is_seen_by_the_graph(dtype):
    G, other = _cuda_g(dtype), _cuda_g(dtype, seed=1)
    sampler = CapturedGenerator(G, 64)
    z = torch.randn(64, G.nz, 1, 1, device="cuda")
    before = sampler(z, clone=True)
    G.load_state_dict(other.state_dict())
    after = sampler(z)
    with torch.no_grad():
        ref = other(z.to(dtype))
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
    assert not torch.equal(after, before)
