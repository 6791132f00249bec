"""fastdcgan.kernels.weights: the kernel layout of conv weights, the step's cast cache and the
gradient sinks (the kernels accumulating into .grad)."""
import collections
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastdcgan import Discriminator, Generator
from fastdcgan.kernels import weights
from fastdcgan.optim import FusedAdam


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _copies(counter):
    return sum(n for op, n in counter.ops.items() if op in ("aten._to_copy", "aten.copy_", "aten.clone"))


@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_view_is_kh_kw_cin_cout(transposed):
    cin, cout = 5, 7
    w = torch.randn((cin, cout, 4, 4) if transposed else (cout, cin, 4, 4))
    wk = weights.kernel_view(w, transposed)
    assert wk.shape == (4, 4, cin, cout)
    kh, kw, ci, co = 1, 3, 4, 6
    assert wk[kh, kw, ci, co] == (w[ci, co, kh, kw] if transposed else w[co, ci, kh, kw])
    assert torch.equal(weights.torch_view(wk, transposed), w)


def _in_kernel_layout(model):
    return all(weights.kernel_view(m.weight, isinstance(m, nn.ConvTranspose2d)).is_contiguous()
               for m in model.main if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))


def test_triton_models_store_their_weights_in_kernel_layout():
    torch.manual_seed(0)
    assert _in_kernel_layout(Generator(nz=8, ngf=4, backend="triton"))
    assert _in_kernel_layout(Discriminator(ndf=4, backend="triton"))
    for backend in ("reference", "auto"):   # CPU convolutions prefer the plain layout
        g = Generator(nz=8, ngf=4, backend=backend)
        assert all(p.is_contiguous() for p in g.parameters())
        x = torch.randn(3, 8)
        before = g(x)
        assert g.use_kernel_layout() is g and _in_kernel_layout(g)
        assert torch.allclose(g(x), before, atol=1e-6)


def test_kernel_layout_keeps_values_state_dicts_and_survives_the_optimizer():
    torch.manual_seed(0)
    ref = Generator(nz=8, ngf=4, backend="reference")
    g = Generator(nz=8, ngf=4, backend="triton")
    g.load_state_dict(ref.state_dict())
    for (name, a), (_, b) in zip(g.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    buf = io.BytesIO()
    torch.save(g.state_dict(), buf)
    buf.seek(0)
    ref.load_state_dict(torch.load(buf, weights_only=True))   # a plain-layout model loads it
    for (name, a), (_, b) in zip(g.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    FusedAdam(g.parameters())   # flat buffer views keep the strides, .grad too
    w = g.main[0].weight
    assert weights.kernel_view(w, True).is_contiguous()
    assert weights.kernel_view(w.grad, True).is_contiguous()


def test_kernel_weights_reads_kernel_layout_in_place_and_copies_other_layouts():
    w = weights.use_kernel_layout(nn.Conv2d(3, 8, 4, bias=False)).weight
    wk = weights.kernel_weights([w], [False], torch.float32)[0]
    assert wk.data_ptr() == w.data_ptr() and wk.is_contiguous()
    plain = torch.randn(8, 3, 4, 4)
    with _CountOps() as count:
        wk = weights.kernel_weights([plain], [False], torch.float32)[0]
    assert _copies(count) == 1 and wk.is_contiguous()
    assert torch.equal(wk, weights.kernel_view(plain, False))


def test_weights_sharing_a_storage_are_cast_in_one_launch_and_cached_within_a_step():
    torch.manual_seed(0)
    d = Discriminator(ndf=4, backend="triton")
    opt = FusedAdam(d.parameters())
    convs = [m.weight for m in d.main if isinstance(m, nn.Conv2d)]
    flags = [False] * len(convs)
    with _CountOps() as count:
        casts = weights.kernel_weights(convs, flags, torch.bfloat16)
    assert _copies(count) == 1
    for w, wk in zip(convs, casts):
        assert wk.dtype == torch.bfloat16 and wk.is_contiguous()
        assert torch.equal(wk, weights.kernel_view(w, False).to(torch.bfloat16))
    with weights.training_step():
        first = weights.kernel_weights(convs, flags, torch.bfloat16)
        with _CountOps() as count:
            again = weights.kernel_weights(convs, flags, torch.bfloat16)
        assert _copies(count) == 0 and again[0].data_ptr() == first[0].data_ptr()
        for p in d.parameters():   # an optimizer step changes the weights: cast anew
            p.grad.normal_()
        opt.step()
        weights.weights_updated()
        after = weights.kernel_weights(convs, flags, torch.bfloat16)
        assert torch.equal(after[1], weights.kernel_view(convs[1], False).to(torch.bfloat16))
        assert not torch.equal(after[1], first[1])
    with _CountOps() as count:   # nothing is cached outside a step
        weights.kernel_weights(convs, flags, torch.bfloat16)
    assert _copies(count) == 1


def test_an_optimizer_step_alone_invalidates_the_cast():
    """FusedAdam bumps the parameters' version counters, which the cache keys on."""
    torch.manual_seed(0)
    d = Discriminator(ndf=4, backend="triton")
    opt = FusedAdam(d.parameters())
    convs = [m.weight for m in d.main if isinstance(m, nn.Conv2d)]
    with weights.training_step():
        before = weights.kernel_weights(convs, [False] * len(convs), torch.bfloat16)
        for p in d.parameters():
            p.grad.normal_()
        opt.step()
        after = weights.kernel_weights(convs, [False] * len(convs), torch.bfloat16)
        assert torch.equal(after[2], weights.kernel_view(convs[2], False).to(torch.bfloat16))
        assert not torch.equal(after[2], before[2])


def test_fused_adams_bf16_copies_replace_the_casts():
    """FusedAdam.bf16_copies handed to provide_copy: inside a step kernel_weights returns views
    of the copy (no cast), the copy follows every optimizer step (written by the adam_step op
    itself), and a copy left stale by an in-place change outside step() is not used."""
    torch.manual_seed(0)
    d = Discriminator(ndf=4, backend="triton")
    opt = FusedAdam(d.parameters(), lr=1e-2)
    convs = [m.weight for m in d.main if isinstance(m, nn.Conv2d)]
    flags = [False] * len(convs)
    ((param, copy, versions),) = opt.bf16_copies()
    for _ in range(2):
        with weights.training_step():
            weights.provide_copy(param, copy, versions)
            with _CountOps() as count:
                wks = weights.kernel_weights(convs, flags, torch.bfloat16)
            assert _copies(count) == 0
            for w, wk in zip(convs, wks):
                assert wk.untyped_storage().data_ptr() == copy.untyped_storage().data_ptr()
                assert torch.equal(wk, weights.kernel_view(w, False).to(torch.bfloat16))
            for p in d.parameters():
                p.grad.normal_()
            opt.step()
            weights.weights_updated()
            # the step rewrote the copy in place, and says so with the new version
            ((param, again, versions),) = opt.bf16_copies()
            assert again is copy and versions == {p.storage_offset(): p._version
                                                   for p in d.parameters()}
            assert torch.equal(copy.view(torch.int16), param.to(torch.bfloat16).view(torch.int16))
    with weights.training_step():
        weights.provide_copy(param, copy, versions)
        with torch.no_grad():
            convs[1].mul_(2)   # not through the optimizer: the copy is stale
        with _CountOps() as count:
            wks = weights.kernel_weights(convs, flags, torch.bfloat16)
        assert _copies(count) == 1
        assert wks[1].untyped_storage().data_ptr() != copy.untyped_storage().data_ptr()
        assert torch.equal(wks[1], weights.kernel_view(convs[1], False).to(torch.bfloat16))
    opt.refresh_bf16_copies()   # rewritten in place (a captured step's graph reads that memory)
    ((_, fresh, versions),) = opt.bf16_copies()
    assert fresh is copy and versions[convs[1].storage_offset()] == convs[1]._version
    assert torch.equal(fresh, param.to(torch.bfloat16))
    weights.provide_copy(param, fresh, versions)   # outside a step: nothing is kept
    with _CountOps() as count:
        weights.kernel_weights(convs, flags, torch.bfloat16)
    assert _copies(count) == 1


@pytest.mark.parametrize("transposed", [False, True])
def test_k_major_is_cout_cin_innermost_and_cached_until_the_weight_changes(transposed):
    """The fp32 forward GEMMs' weight (TF32 wgmma reads B K-major): [kh, kw, c_out, c_in]."""
    torch.manual_seed(0)
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = weights.use_kernel_layout(cls(5, 7, 4, bias=False))
    wk = weights.kernel_view(conv.weight.detach(), transposed)
    km = weights.k_major(wk)
    assert km.shape == (4, 4, 7, 5) and km.is_contiguous()
    assert torch.equal(km, wk.permute(0, 1, 3, 2))
    assert weights.k_major(wk).data_ptr() != km.data_ptr()   # outside a step: a new copy
    with weights.training_step():
        first = weights.k_major(wk)
        assert weights.k_major(wk).data_ptr() == first.data_ptr()
        with torch.no_grad():
            conv.weight.mul_(2)   # an in-place update bumps the version the cache keys on
        again = weights.k_major(wk)
        assert torch.equal(again, 2 * km) and again.data_ptr() != first.data_ptr()


def test_grad_sink_only_inside_a_step_and_only_for_an_fp32_grad_of_kernel_layout():
    conv = weights.use_kernel_layout(nn.ConvTranspose2d(4, 6, 4, bias=False))
    w = conv.weight
    assert weights.grad_sink(w, True) is None               # outside training_step
    with weights.training_step():
        assert weights.grad_sink(w, True) is None           # no .grad yet
        w.grad = torch.zeros_like(w)                        # zeros_like keeps the strides
        sink = weights.grad_sink(w, True)
        assert sink is not None and sink.data_ptr() == w.grad.data_ptr() and sink.shape == (4, 4, 4, 6)
        w.grad = torch.zeros(w.shape)                       # PyTorch-contiguous: not kernel layout
        assert weights.grad_sink(w, True) is None
        h = torch.zeros(6, dtype=torch.float16, requires_grad=True)
        h.grad = torch.zeros(6, dtype=torch.float16)
        assert weights.grad_sink(h) is None                 # the kernels accumulate in fp32 only
        b = torch.zeros(6, requires_grad=True)
        b.grad = torch.zeros(6)
        assert weights.grad_sink(b).data_ptr() == b.grad.data_ptr()
        w.requires_grad_(False)
        assert weights.grad_sink(w, True) is None
