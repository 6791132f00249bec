"""The GEMM kernels at the tiles a GPU runs them with, on the CPU.

The other interpreter tests use the interpreter's own tiles (kernels/implicit_gemm.py: 32- or
512-row tiles, a 2-way pixel split), so the tiles an H100 takes (128-row tiles, 128-column tiles
over wider outputs, 32/64-wide K steps, the weight gradient split for 132 SMs, tiles.json) would
otherwise only ever be run on a GPU. Here implicit_gemm's INTERPRET switch is turned off around
one full-width training step (G forward; D on real and fake in one grouped pass, backward into
D; D frozen, backward into G) at a small batch, and every GEMM launch is checked against float64
PyTorch on its own inputs: outputs, activations, BN partial statistics and sums, and weight
gradients. Per launch, not end to end: at full width some pre-activations sit within rounding of
zero, where an end-to-end gradient check flips ReLU' against the reference however right the
kernels are (the sums below allow for exactly those elements).
"""
import pytest
import torch
import torch.nn.functional as F

from fastdcgan import Discriminator, Generator
from fastdcgan.kernels import block, implicit_gemm
from fastdcgan.kernels.activations import ACTIVATIONS
from fastdcgan.kernels.weights import kernel_view, torch_view
from precision import ACTS, interpreter_only, use_feed

pytestmark = pytest.mark.usefixtures("poison")
ACT_NAMES = {code: name for name, code in ACTIVATIONS.items()}
KINK = 1e-4   # |pre-activation| below which ReLU' / LeakyReLU' may differ from float64's


def act64(z, act, slope):
    """The activation with code `act` (kernels/activations.py), as the reference blocks apply it."""
    return ACTS[ACT_NAMES[act]](slope)(z)


def act_grad(z, act, slope):
    if act == 1:
        return (z > 0).double()
    if act == 2:
        return torch.where(z > 0, 1.0, slope).double()
    if act == 3:
        return 1 - torch.tanh(z) ** 2
    if act == 4:
        return torch.sigmoid(z) * (1 - torch.sigmoid(z))
    return torch.ones_like(z)


def kinked(z, act):
    """Elements whose activation derivative depends on rounding (ReLU / LeakyReLU at ~0)."""
    return (z.abs() < KINK) if act in (1, 2) else torch.zeros_like(z, dtype=torch.bool)


def per_group(vec, groups, like):
    """[groups * C] vector -> broadcastable over an NHWC tensor of `groups` equal batches."""
    c = like.shape[-1]
    v = vec.double().reshape(groups, 1, 1, 1, c)
    return v.expand(groups, like.shape[0] // groups, 1, 1, c).reshape(like.shape[0], 1, 1, c)


def conv_of(geom):
    """(transposed, stride, padding) of the convolution a Geom describes (make_geom's inverse)."""
    if geom.phw == 2:
        return True, 2, 1
    if geom.phw == 4:
        return True, 1, 0
    if geom.tstep == -1:
        return True, 1, geom.ioff
    return False, geom.in_s, -geom.ioff


def conv64(x, wk, geom, w_t):
    """float64 NHWC convolution of `geom` with the kernel-layout weight (w_t: the transposed
    weight of the opposite direction, as a data gradient reads it)."""
    transposed, stride, padding = conv_of(geom)
    w = torch_view(wk.double(), transposed != w_t)
    op = F.conv_transpose2d if transposed else F.conv2d
    return op(x.permute(0, 3, 1, 2).double(), w, stride=stride, padding=padding).permute(0, 2, 3, 1)


def operand64(x, pro, bwd, groups):
    """What a GEMM reads, in float64: x raw, act(x*scale + shift) (pro), or dy (bwd); a
    transformed operand rounded to the stored dtype, as the kernel rounds it for its dot."""
    if bwd is not None:
        if isinstance(bwd, torch.Tensor):
            return bwd.double()
        y = bwd.y.double()
        if bwd.scale is None:
            dy = bwd.g.double() * act_grad(y, bwd.act, bwd.slope)
        else:
            z = y * per_group(bwd.scale, groups, y) + per_group(bwd.shift, groups, y)
            dz = bwd.g.double() * act_grad(z, bwd.act, bwd.slope)
            dy = (per_group(bwd.ca, groups, y) * dz + per_group(bwd.cb, groups, y) * y
                  + per_group(bwd.cc, groups, y))
        return dy.to(bwd.g.dtype).double()
    if pro is None:
        return x.double()
    z = x.double()
    if pro.scale is not None:
        z = z * per_group(pro.scale, groups, z) + per_group(pro.shift, groups, z)
    return act64(z, pro.act, pro.slope).to(x.dtype).double()


def close(out, ref, tol, what, slack=None):
    """|out - ref| <= tol * max|ref| (+ slack, elementwise) everywhere."""
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), f"{what}: NaN (an element the kernel did not write)"
    bound = tol * ref.abs().max().clamp_min(1e-12) + (0 if slack is None else slack)
    worst = ((out - ref).abs() - bound).max().item()
    assert worst <= 0, f"{what}: off by {worst:.3g} beyond the tolerance"


class Checker:
    """Wraps block's GEMM entry points: runs each, then checks it against float64 PyTorch."""

    def __init__(self, tol):
        self.tol, self.launches = tol, []

    def conv_gemm(self, x, w, geom, cout, *, w_t=False, pro=None, bwd=None, store_y=True, epi=None,
                  store_a=False, stats=0, prod=None, grad_act=None, groups=1):
        y, a, partials = implicit_gemm.conv_gemm(
            x, w, geom, cout, w_t=w_t, pro=pro, bwd=bwd, store_y=store_y, epi=epi,
            store_a=store_a, stats=stats, prod=prod, grad_act=grad_act, groups=groups)
        what = (f"conv_gemm {geom.ih}x{geom.iw}->{geom.oh}x{geom.ow} -> {cout}"
                f"{' dgrad' if w_t else ''}")
        self.launches.append(what)
        ref = conv64(operand64(x, pro, bwd, groups), w, geom, w_t)
        if grad_act is not None:
            py, act, slope = grad_act
            ref = ref * act_grad(py.double(), act, slope)
        if store_y:
            close(y, ref, self.tol, what)
        if store_a:
            z = ref
            if epi.scale is not None:
                z = z * per_group(epi.scale, groups, z) + per_group(epi.shift, groups, z)
            close(a, act64(z, epi.act, epi.slope), self.tol, what + " activation")
        if stats == 1:
            self._check_bn_partials(partials, ref, groups, what)
        elif stats == 2:
            self._check_bn_sums(partials, ref, prod, groups, what)
        return y, a, partials

    def _check_bn_partials(self, partials, ref, groups, what):
        # (count, mean, M2) per row tile, rows group by group: merged per group (Chan) they give
        # the group's batch mean and sum of squared deviations
        mean_t, m2_t, cnt = (t.double() for t in partials)
        c = ref.shape[-1]
        for g, (mt, qt, nt, r) in enumerate(zip(mean_t.chunk(groups), m2_t.chunk(groups),
                                                  cnt.chunk(groups), ref.chunk(groups))):
            r = r.reshape(-1, c)
            assert nt.sum().item() == r.shape[0], f"{what}: group {g} counts {nt.sum().item()} rows"
            mean = (nt[:, None] * mt).sum(0) / nt.sum()
            m2 = (qt + nt[:, None] * (mt - mean) ** 2).sum(0)
            close(mean, r.mean(0), self.tol, f"{what} group {g} BN mean")
            close(m2, ((r - r.mean(0)) ** 2).sum(0), self.tol, f"{what} group {g} BN M2")

    def _check_bn_sums(self, partials, dx, prod, groups, what):
        # the producer's BN backward sums, sum(dz) and sum(dz*xhat), per group
        y, scale, shift, mean, rstd, act, slope = prod
        y = y.double()
        z = y * per_group(scale, groups, y) + per_group(shift, groups, y)
        dz = dx * act_grad(z, act, slope)
        xhat = (y - per_group(mean, groups, y)) * per_group(rstd, groups, y)
        amb = kinked(z, act).double() * dx.abs()   # what a flipped derivative may change
        c = y.shape[-1]
        for g, (s0, s1, d, xh, am) in enumerate(zip(
                partials[0].chunk(groups), partials[1].chunk(groups), dz.chunk(groups),
                xhat.chunk(groups), amb.chunk(groups))):
            d, xh, am = d.reshape(-1, c), xh.reshape(-1, c), am.reshape(-1, c)
            close(s0.sum(0), d.sum(0), self.tol, f"{what} group {g} sum(dz)", am.sum(0))
            close(s1.sum(0), (d * xh).sum(0), self.tol, f"{what} group {g} sum(dz*xhat)",
                  (am * xh.abs()).sum(0))

    def conv_wgrad(self, x, pro, bwd, geom, dw=None, groups=1):
        before = None if dw is None else dw.clone()
        dw = implicit_gemm.conv_wgrad(x, pro, bwd, geom, dw, groups)
        what = f"conv_wgrad {geom.ih}x{geom.iw}->{geom.oh}x{geom.ow} {tuple(dw.shape)}"
        self.launches.append(what)
        xin = operand64(x, pro, None, groups).permute(0, 3, 1, 2)
        dy = operand64(None, None, bwd, groups).permute(0, 3, 1, 2)
        transposed, stride, padding = conv_of(geom)
        if transposed:   # the weight gradient of a transposed conv is that of the conv from dy to x
            ref = torch.nn.grad.conv2d_weight(dy, (x.shape[-1], dy.shape[1], 4, 4), xin,
                                              stride=stride, padding=padding)
        else:
            ref = torch.nn.grad.conv2d_weight(xin, (dy.shape[1], x.shape[-1], 4, 4), dy,
                                              stride=stride, padding=padding)
        added = dw.double() - (0 if before is None else before.double())
        close(added, kernel_view(ref, transposed), self.tol, what)
        return dw

    def gemv(self, x, w, cout, *, pro=None, epi=None, store_y=True, store_a=False, groups=1):
        y, a = implicit_gemm.gemv(x, w, cout, pro=pro, epi=epi, store_y=store_y, store_a=store_a,
                                  groups=groups)
        what = f"gemv {tuple(x.shape)} -> {cout}"
        self.launches.append(what)
        xin = operand64(x, pro, None, groups)
        ref = (xin.reshape(x.shape[0], -1) @ w.double().reshape(-1, cout)).reshape(-1, 1, 1, cout)
        if store_y:
            close(y, ref, self.tol, what)
        if store_a:
            close(a, act64(ref, epi.act, epi.slope), self.tol, what + " activation")
        return y, a


@pytest.fixture
def gpu_tiles(monkeypatch):
    """implicit_gemm as on an H100 (132 SMs), with the measured tile table, checked per launch."""
    monkeypatch.setattr(implicit_gemm, "INTERPRET", False)
    monkeypatch.setattr(implicit_gemm, "_num_sms", lambda device: 132)
    monkeypatch.setattr(implicit_gemm, "_TILE_TABLE", None)
    monkeypatch.setattr(implicit_gemm, "_BUCKETS", None)
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    checker = Checker(tol=1e-5)
    for name in ("conv_gemm", "conv_wgrad", "gemv"):
        monkeypatch.setattr(block, name, getattr(checker, name))
    yield checker


def training_step(checker, width, batch, feed, monkeypatch, dtype=torch.float32):
    """One training step's passes at ngf = ndf = width in `dtype` with the operand feed `feed`
    (precision.FEEDS): G forward; D on real and fake in one grouped pass, backward into D; D
    frozen, backward into G. Returns the launches' kinds."""
    use_feed(feed, monkeypatch)
    torch.manual_seed(0)
    G = Generator(ngf=width, backend="triton").to(dtype)
    D = Discriminator(ndf=width, backend="triton").to(dtype)
    fake = G(torch.randn(batch, 100, 1, 1, dtype=dtype))
    real = (torch.rand(batch, 3, 64, 64) * 2 - 1).to(dtype)
    D.logits(torch.cat([real, fake.detach()]), groups=2).float().sum().backward()
    D.requires_grad_(False)
    D.logits(fake).float().sum().backward()
    return [w.split()[0] for w in checker.launches]


@interpreter_only
@pytest.mark.parametrize("feed, dtype", [("both-materialized", torch.float32),
                                         ("prologues", torch.float32),
                                         ("both-materialized", torch.bfloat16)],
                         ids=["both-materialized-fp32", "prologues-fp32", "both-materialized-bf16"])
def test_training_step_gemms_at_gpu_tiles(gpu_tiles, feed, dtype, monkeypatch):
    """Every GEMM of a training step with the default feed (activations and dy materialized: raw
    operands) and through the prologues, at half the DCGAN widths (the interpreter's time: ~2-3
    minutes a case): the layers still have 32-256 channels, so several column tiles, aligned and
    flat K steps, split weight gradients. In bf16 too (the default feed), whose tiles differ
    (256-row weight-gradient K tiles): each launch within 6e-3 of float64 on its own bf16 inputs
    (rounding the output to bf16 alone errs up to 2e-3; measured at most 3.4e-3 at full width).
    At batch 8 D's grouped pass runs as two (D's last layer would need 16 images a group).
    Checked by hand with training_step(), too slow for CI: full widths at batch 8 in both feeds,
    fp32 and bf16 (tiles.json's entries in the prologue one), and half widths at batch 16, i.e.
    D's grouped GEMMs."""
    if dtype == torch.bfloat16:
        gpu_tiles.tol = 6e-3
    kinds = training_step(gpu_tiles, 32, 8, feed, monkeypatch, dtype)
    # forward: G's 5 GEMMs, D's 4 and its last layer's GEMV per pass (3 passes); backward: D's 4
    # data and 5 weight gradients (real and fake), 5 data gradients (frozen pass, into G), G's 4
    # and 5
    assert kinds.count("gemv") == 3
    assert kinds.count("conv_wgrad") == 2 * 5 + 5
    assert kinds.count("conv_gemm") == 5 + 3 * 4 + 2 * 4 + 5 + 4
