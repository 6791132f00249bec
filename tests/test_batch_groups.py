"""Batch groups: one fused pass over `groups` equal batches, each with its own BatchNorm
statistics (what the training step uses to score real and fake images in one D pass), against
the reference modules run on each batch in turn: outputs, every gradient, running statistics and
num_batches_tracked. Plus the sync-BN order of partial rows (process, group, tile) in the BN
finalize kernels, and Discriminator.logits(x, groups) falling back to one pass per batch.

CPU (Triton interpreter): small maps (16 images per group is the smallest the last 4x4 -> 1x1
layer groups). CUDA: the full-size discriminator at 64 images per group, fp32 and bf16.
"""
import copy

import pytest
import torch
from torch import nn

from fastdcgan import Discriminator, ops
from fastdcgan.kernels import bn
from precision import DEV, interpreter_only, needs_cuda, rel_err

pytestmark = pytest.mark.usefixtures("poison")
ACT = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Identity: "none"}


def _conv_chain(c):
    """D-like: 16x16 -> 8 -> 4 -> 1 (GEMV), BatchNorm but on the last."""
    return nn.Sequential(
        nn.Conv2d(3, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * c, 3 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(3 * c), nn.LeakyReLU(0.2),
        nn.Conv2d(3 * c, 1, 4, 1, 0, bias=False), nn.Identity(), nn.Identity())


def _transposed_chain(c):
    """G-like, BatchNorm on every block (the last one's backward reduces its own BN sums):
    z 1x1 -> 4 -> 8 -> 16."""
    return nn.Sequential(
        nn.ConvTranspose2d(8, 3 * c, 4, 1, 0, bias=False), nn.BatchNorm2d(3 * c), nn.ReLU(),
        nn.ConvTranspose2d(3 * c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.ConvTranspose2d(2 * c, 3, 4, 2, 1, bias=False), nn.BatchNorm2d(3), nn.Tanh())


def _randomize(chain):
    torch.manual_seed(1)
    for m in chain.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.2)
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return chain


def _blocks(chain):
    """ops.fused_network's blocks for a chain of (conv, BatchNorm2d or Identity, activation)."""
    mods = list(chain)
    blocks = []
    for conv, norm, act in zip(mods[0::3], mods[1::3], mods[2::3]):
        b = dict(weight=conv.weight, transposed=isinstance(conv, nn.ConvTranspose2d),
                 stride=conv.stride[0], padding=conv.padding[0], activation=ACT[type(act)],
                 negative_slope=getattr(act, "negative_slope", 0.2))
        if isinstance(norm, nn.BatchNorm2d):
            b.update(gamma=norm.weight, beta=norm.bias, running_mean=norm.running_mean,
                     running_var=norm.running_var, num_batches_tracked=norm.num_batches_tracked,
                     momentum=norm.momentum, eps=norm.eps)
        blocks.append(b)
    return blocks


@interpreter_only
@pytest.mark.parametrize("kind,groups,materialize_act,materialize_dy", [
    ("conv", 2, "0", "0"), ("conv", 2, "0", "1"), ("conv", 2, "1", "0"), ("transposed", 3, "0", "0")])
def test_grouped_pass_equals_one_call_per_batch(kind, groups, materialize_act, materialize_dy,
                                                monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    monkeypatch.setenv("FASTDCGAN_MATERIALIZE_ACT", materialize_act)
    monkeypatch.setenv("FASTDCGAN_MATERIALIZE_DY", materialize_dy)
    check_grouped_pass(kind, groups)


def check_grouped_pass(kind, groups, width=4):
    """A D-like ("conv") or G-like chain of channel width `width` run on `groups` batches in
    one grouped pass equals the float64 chain run batch after batch: output, input gradient,
    parameter gradients, running statistics and batch counts."""
    chain = _randomize(_conv_chain(width) if kind == "conv" else _transposed_chain(width))
    ref = copy.deepcopy(chain).double()
    shape = (16 * groups, 3, 16, 16) if kind == "conv" else (16 * groups, 8, 1, 1)
    x = torch.randn(shape, requires_grad=True)
    xr = x.detach().double().requires_grad_()
    out = ops.fused_network(x, _blocks(chain), groups=groups)
    out_r = torch.cat([ref(part) for part in xr.chunk(groups)])   # batch after batch
    assert rel_err(out, out_r) < 1e-5
    upstream = torch.randn(out.shape, dtype=torch.float64)
    (out * upstream.float()).sum().backward()
    (out_r * upstream).sum().backward()
    assert rel_err(x.grad, xr.grad) < 1e-4
    for (name, p), (_, pr) in zip(chain.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, pr.grad) < 1e-4, name
    for (name, b), (_, br) in zip(chain.named_buffers(), ref.named_buffers()):
        if b.is_floating_point():
            assert rel_err(b, br) < 1e-5, name
        else:
            assert int(b) == int(br) == groups, name


class _TwoProcesses:
    """A sync-BN gather standing in for a second process whose rows are `other`'s."""
    world_size = 2

    def __init__(self, other):
        self.other = other

    def gather(self, tensors):
        return tuple(torch.cat([mine, theirs]) for mine, theirs in zip(tensors, self.other))


def _forward_partials(data, tiles):
    """(mean_t, m2_t, cnt) rows of data [groups, rows, C], group by group, `tiles` per group."""
    parts = [t for group in data for t in group.chunk(tiles)]
    mean_t = torch.stack([t.mean(0) for t in parts])
    m2_t = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in parts])
    return mean_t, m2_t, torch.tensor([float(t.shape[0]) for t in parts])


@interpreter_only
def test_sync_bn_finalize_reads_the_rows_of_every_process_group_by_group(monkeypatch):
    """Two processes x 3 groups: each group's statistics over both processes' rows of that
    group; running stats updated group by group; backward coefficients and summed dgamma/dbeta."""
    groups, tiles, c, momentum = 3, 5, 40, 0.1
    torch.manual_seed(0)
    data = torch.randn(2, groups, 70, c) * torch.rand(c) + torch.randn(c)   # [process, group, rows, C]
    mine, theirs = (_forward_partials(data[p], tiles) for p in range(2))
    monkeypatch.setattr(bn, "_partials_sync", _TwoProcesses(theirs))
    gamma, beta = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv, counter = torch.randn(c), torch.rand(c) + 0.5, torch.zeros(1, dtype=torch.int64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    mean, rstd, scale, shift = bn.bn_finalize(mine, gamma, beta, rm, rv, training=True,
                                              momentum=momentum, eps=1e-5, batches_tracked=counter,
                                              groups=groups)
    whole = data.transpose(0, 1).reshape(groups, -1, c)   # each group's rows of both processes
    mean_ref, var_ref = whole.mean(1), whole.var(1, unbiased=False)
    for g in range(groups):
        rm_ref = (1 - momentum) * rm_ref + momentum * mean_ref[g]
        rv_ref = (1 - momentum) * rv_ref + momentum * whole[g].var(0, unbiased=True)
    assert rel_err(mean, mean_ref.reshape(-1)) < 1e-5
    assert rel_err(rstd, (var_ref + 1e-5).rsqrt().reshape(-1)) < 1e-5
    assert rel_err(scale, (gamma * (var_ref + 1e-5).rsqrt()).reshape(-1)) < 1e-5
    assert rel_err(shift, (beta - mean_ref * gamma * (var_ref + 1e-5).rsqrt()).reshape(-1)) < 1e-5
    assert rel_err(rm, rm_ref) < 1e-5 and rel_err(rv, rv_ref) < 1e-5
    assert int(counter) == groups

    # backward: per-tile sums (dz, dz*xhat) laid out the same way
    sums = torch.randn(2, groups * tiles, c), torch.randn(2, groups * tiles, c)
    monkeypatch.setattr(bn, "_partials_sync", _TwoProcesses((sums[0][1], sums[1][1])))
    count = groups * 70   # this process's rows, all groups
    dgamma, dbeta, ca, cb, cc = bn.bn_bwd_finalize((sums[0][0], sums[1][0]), gamma, mean, rstd, count,
                                                   training=True, groups=groups)
    dbeta_g = sums[0].reshape(2, groups, tiles, c).sum((0, 2))   # per group, both processes
    dgamma_g = sums[1].reshape(2, groups, tiles, c).sum((0, 2))
    n, r, mu = 2 * 70, rstd.view(groups, c), mean.view(groups, c)
    assert rel_err(dbeta, dbeta_g.sum(0) / 2) < 1e-5     # this process's share (1 / world)
    assert rel_err(dgamma, dgamma_g.sum(0) / 2) < 1e-5
    assert rel_err(ca, (gamma * r).reshape(-1)) < 1e-5
    assert rel_err(cb, (-gamma * r * r * dgamma_g / n).reshape(-1)) < 1e-5
    assert rel_err(cc, (gamma * r * (r * mu * dgamma_g - dbeta_g) / n).reshape(-1)) < 1e-5


def test_grouped_logits_need_equal_batches():
    d = Discriminator(ndf=4, backend="reference")
    with pytest.raises(ValueError, match="does not split into 2 equal groups"):
        d.logits(torch.randn(3, 3, 64, 64), groups=2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="groups must be a positive int"):
            d.logits(torch.randn(4, 3, 64, 64), groups=bad)


@interpreter_only
def test_fused_network_refuses_groups_whose_rows_straddle_tiles():
    chain = _conv_chain(4)
    with pytest.raises(ValueError, match="16"):
        ops.fused_network(torch.randn(8, 3, 16, 16), _blocks(chain), groups=2)
    with pytest.raises(ValueError, match="does not split into 3 equal groups"):
        ops.fused_network(torch.randn(32, 3, 16, 16), _blocks(chain), groups=3)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        ops.fused_network(torch.randn(32, 3, 16, 16), _blocks(chain), groups=0)


@interpreter_only
def test_logits_of_small_groups_run_one_pass_per_batch(monkeypatch):
    """2 images per group cannot share the fused pass (the last layer's GEMMs would straddle
    groups): the triton backend scores each batch in its own pass, with the same results."""
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    torch.manual_seed(0)
    d = Discriminator(ndf=4, backend="triton")
    ref = copy.deepcopy(d).double().set_backend("reference")
    x = torch.randn(4, 3, 64, 64)
    out, out_r = d.logits(x, groups=2), torch.cat([ref.logits(p) for p in x.double().chunk(2)])
    assert rel_err(out, out_r) < 1e-5
    for (name, b), (_, br) in zip(d.named_buffers(), ref.named_buffers()):
        assert rel_err(b, br) < 1e-5 if b.is_floating_point() else int(b) == int(br) == 2, name


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-2), (torch.bfloat16, 5e-2)])
def test_full_size_discriminator_scores_real_and_fake_in_one_pass_gpu(dtype, tol):
    """D on cat(real, fake) with groups=2 (the training step's D update) against two separate
    calls of the same fused backend: logits, gradients, running statistics."""
    torch.manual_seed(0)
    d = Discriminator(backend="triton").to(DEV)
    two = copy.deepcopy(d)
    x = torch.randn(128, 3, 64, 64, device=DEV)
    w = torch.randn(128, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = d.logits(x, groups=2)
        out2 = torch.cat([two.logits(p) for p in x.chunk(2)])
    assert rel_err(out.float(), out2.float()) < tol
    (out.float() * w).sum().backward()
    (out2.float() * w).sum().backward()
    for (name, p), (_, p2) in zip(d.named_parameters(), two.named_parameters()):
        assert rel_err(p.grad, p2.grad) < tol, name
    for (name, b), (_, b2) in zip(d.named_buffers(), two.named_buffers()):
        assert rel_err(b, b2) < tol if b.is_floating_point() else torch.equal(b, b2), name
