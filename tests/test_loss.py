"""fastdcgan.loss (fused loss + gradient, and the GAN losses of several parts) against
F.binary_cross_entropy_with_logits."""
import pytest
import torch
import torch.nn.functional as F

from fastdcgan import _ext
from fastdcgan.loss import bce_with_logits, bce_with_logits_and_grad, bce_with_logits_of_parts

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-15),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-3), torch.float16: dict(rtol=1e-3, atol=1e-4)}


def _reference(logits, target):
    x = logits.detach().double().requires_grad_()
    loss = F.binary_cross_entropy_with_logits(x, torch.full_like(x, target))
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", [1.0, 0.0, 0.9])
@pytest.mark.parametrize("shape", [(128,), (512,), (3, 1, 1, 1), (1,), (70_000,)])
def test_value_and_grad_match_torch(device, target, shape):
    torch.manual_seed(0)
    logits = (torch.randn(shape, device=device) * 4).requires_grad_()
    loss = bce_with_logits(logits, target)
    loss.backward()
    ref_loss, ref_grad = _reference(logits, target)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, **TOL[torch.float32])
    torch.testing.assert_close(logits.grad.double(), ref_grad, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", [1.0, 0.0])
def test_large_logits_are_finite(device, target):
    logits = torch.tensor([0.0, 1e-8, -1e-8, 20.0, -20.0, 88.0, -88.0, 100.0, -100.0, 1e4, -1e4,
                           3e38, -3e38], device=device, requires_grad=True)
    loss = bce_with_logits(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    ref_loss, ref_grad = _reference(logits, target)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes(device, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(256, device=device) * 3).to(dtype).requires_grad_()
    loss = bce_with_logits(logits, 1.0)
    loss.backward()
    assert loss.dtype == dtype and logits.grad.dtype == dtype
    ref_loss, ref_grad = _reference(logits, 1.0)
    torch.testing.assert_close(loss.double(), ref_loss, **TOL[dtype])
    torch.testing.assert_close(logits.grad.double(), ref_grad, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_scales_saved_grad_by_grad_output(device):
    logits = torch.randn(64, device=device, requires_grad=True)
    (3.0 * bce_with_logits(logits, 0.0) + bce_with_logits(logits, 1.0)).backward()
    x = logits.detach().clone().requires_grad_()
    (3.0 * F.binary_cross_entropy_with_logits(x, torch.zeros_like(x))
     + F.binary_cross_entropy_with_logits(x, torch.ones_like(x))).backward()
    torch.testing.assert_close(logits.grad, x.grad, rtol=1e-6, atol=1e-8)


def test_gradient_flows_into_a_network():
    from fastdcgan import Discriminator

    torch.manual_seed(0)
    net = Discriminator()
    x = torch.randn(4, 3, 64, 64)
    bce_with_logits(net.logits(x), 1.0).backward()
    ours = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    F.binary_cross_entropy_with_logits(net.logits(x), torch.ones(4)).backward()
    for a, b in zip(ours, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_loss_and_grad_without_autograd():
    logits = torch.randn(32, requires_grad=True)
    loss, grad = bce_with_logits_and_grad(logits, 1.0)
    assert not loss.requires_grad and not grad.requires_grad
    ref_loss, ref_grad = _reference(logits, 1.0)
    torch.testing.assert_close(loss.double(), ref_loss)
    torch.testing.assert_close(grad.double(), ref_grad)


def _parts_reference(logits, targets):
    """Sum of each part's mean BCE, its gradient and each part's mean sigmoid, in float64."""
    x = logits.detach().double().requires_grad_()
    parts = x.chunk(len(targets))
    loss = sum(F.binary_cross_entropy_with_logits(p, torch.full_like(p, t))
               for p, t in zip(parts, targets))
    loss.backward()
    return loss.detach(), x.grad, torch.stack([torch.sigmoid(p.detach()).mean() for p in parts])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("targets,n", [((1.0, 0.0), 256), ((1.0, 0.0), 2), ((1.0,), 128),
                                       ((0.9, 0.0, 1.0), 3 * 37), ((1.0, 0.0), 70_000)])
def test_parts_match_torch(device, dtype, targets, n):
    torch.manual_seed(1)
    logits = (torch.randn(n, device=device) * 4).to(dtype)
    loss, grad, mean_prob = bce_with_logits_of_parts(logits, targets)
    ref_loss, ref_grad, ref_prob = _parts_reference(logits, targets)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == acc and mean_prob.shape == (len(targets),)
    assert mean_prob.dtype == acc and grad.dtype == dtype and grad.shape == logits.shape
    tol = TOL[acc]   # loss and probabilities: fp32 math on the logits as given
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    torch.testing.assert_close(mean_prob.double(), ref_prob, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_parts_gradient_drives_backward_like_the_loss(device):
    """torch.autograd.backward(logits, grad) gives what loss.backward() of the summed losses does."""
    torch.manual_seed(2)
    w = torch.randn(16, device=device, requires_grad=True)
    x = torch.randn(64, 16, device=device)
    logits = x @ w
    _, grad, _ = bce_with_logits_of_parts(logits, (1.0, 0.0))
    torch.autograd.backward(logits, grad)
    ours = w.grad.clone()
    w.grad = None
    real, fake = (x @ w).chunk(2)
    (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
     + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))).backward()
    torch.testing.assert_close(ours, w.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_parts_bad_arguments(device):
    with pytest.raises(RuntimeError, match="7 logits do not split into 2 equal parts"):
        bce_with_logits_of_parts(torch.randn(7, device=device), (1.0, 0.0))
    with pytest.raises(RuntimeError, match="between 1 and 8 targets"):
        bce_with_logits_of_parts(torch.randn(9, device=device), [1.0] * 9)
    with pytest.raises(RuntimeError, match="between 1 and 8 targets"):
        bce_with_logits_of_parts(torch.randn(4, device=device), [])
    with pytest.raises(TypeError, match="constant label"):
        bce_with_logits_of_parts(torch.randn(4, device=device), (torch.ones(()), 0.0))
    with pytest.raises(RuntimeError, match="target must be finite"):
        bce_with_logits_of_parts(torch.randn(4, device=device), (1.0, float("inf")))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    with pytest.raises(TypeError, match="constant label"):
        bce_with_logits(torch.randn(4, device=device), torch.ones(4))
    for dtype in (torch.long, torch.float8_e4m3fn):  # float8 is floating but has no kernel
        with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
            bce_with_logits(torch.ones(4, device=device).to(dtype), 1.0)
    with pytest.raises(RuntimeError, match="empty"):
        bce_with_logits(torch.randn(0, device=device), 1.0)
    with pytest.raises(RuntimeError, match="target must be finite"):
        bce_with_logits(torch.randn(4, device=device), float("nan"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    _ext.load()
    op = torch.ops.fastdcgan.bce_with_logits.default
    for shape in [(128,), (4, 1, 1, 1)]:
        torch.library.opcheck(op, (torch.randn(shape, device=device, dtype=dtype), [1.0]))
        torch.library.opcheck(
            op, (torch.randn(shape, device=device, dtype=dtype, requires_grad=True), [0.0]))
        torch.library.opcheck(op, (torch.randn(shape, device=device, dtype=dtype), [1.0, 0.0]))
    torch.library.opcheck(op, (torch.randn(8, 3, device=device).t(), [0.5, 1.0, 0.0]))  # strided
