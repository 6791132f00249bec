"""FusedAdam (fastdcgan.optim) and the fastdcgan::adam_step op against torch.optim.Adam."""
import copy
import io
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from fastdcgan import Discriminator, Generator, _ext
from fastdcgan.optim import FusedAdam

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]
NETS = {"G": Generator, "D": Discriminator}
G_PARAMS, D_PARAMS = 3_576_704, 2_765_568

# Agreement "to fp32 rounding": both sides do the same fp32 operations, differing only in the odd
# rounding (ATen's CPU sqrt is not always correctly rounded; CUDA kernels contract differently).
TOL = dict(rtol=1e-5, atol=1e-7)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _pair(net, device, **kw):
    """The same random network twice: one for FusedAdam, one for torch.optim.Adam."""
    a = NETS[net]().to(device)
    b = copy.deepcopy(a)
    fa = FusedAdam(a.parameters(), **kw)
    ta = torch.optim.Adam(b.parameters(), lr=kw.get("lr", 2e-4), betas=kw.get("betas", (0.5, 0.999)),
                          eps=kw.get("eps", 1e-8), weight_decay=kw.get("weight_decay", 0))
    return a, fa, b, ta


def _grads(params, kind, step):
    out = []
    for p in params:
        g = torch.randn_like(p)
        if kind == "zero" or (kind == "mixed" and step % 3 == 1):
            g.zero_()
        elif kind == "sparse":
            g *= (torch.rand_like(p) < 0.05)
        elif kind == "mixed":
            g *= 10.0 ** torch.randint(-6, 3, p.shape, device=p.device)
        out.append(g)
    return out


def _set_grads(fa_params, ta_params, grads):
    for pa, pb, g in zip(fa_params, ta_params, grads):
        pa.grad.copy_(g)  # lands in FusedAdam's flat grad buffer
        pb.grad = g.clone()


def _assert_same(a, fa, b, ta, tol=TOL):
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, **tol)
        sa, sb = fa.state[pa], ta.state[pb]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], **tol)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], **tol)
        assert float(sa["step"]) == float(sb["step"])


def _run(a, fa, b, ta, steps, kind="random"):
    pa, pb = list(a.parameters()), list(b.parameters())
    for s in range(steps):
        _set_grads(pa, pb, _grads(pb, kind, s))
        fa.step()
        ta.step()


def test_dcgan_parameter_counts():
    assert sum(p.numel() for p in Generator().parameters()) == G_PARAMS
    assert sum(p.numel() for p in Discriminator().parameters()) == D_PARAMS


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net", ["G", "D"])
def test_matches_torch_adam_20_steps(net, device):
    a, fa, b, ta = _pair(net, device)
    _run(a, fa, b, ta, 20)
    _assert_same(a, fa, b, ta)
    assert float(fa.flat_buffers()["step"]) == 20.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["zero", "sparse", "mixed"])
def test_matches_torch_adam_special_grads(kind, device):
    a, fa, b, ta = _pair("D", device)
    _run(a, fa, b, ta, 20, kind)
    _assert_same(a, fa, b, ta)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_decay_and_hyperparameter_changes(device):
    a, fa, b, ta = _pair("G", device, weight_decay=1e-2, eps=1e-6)
    _run(a, fa, b, ta, 10)
    for opt in (fa, ta):  # changed through param_groups between steps, as schedulers do
        opt.param_groups[0].update(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    _run(a, fa, b, ta, 10, "sparse")
    _assert_same(a, fa, b, ta)


def test_params_are_views_of_one_flat_buffer():
    net = Discriminator().to(memory_format=torch.channels_last)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    strides = {n: p.stride() for n, p in net.named_parameters()}
    opt = FusedAdam(net.parameters())
    flat = opt.flat_buffers()
    for n, p in net.named_parameters():
        assert p.untyped_storage().data_ptr() == flat["param"].untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == flat["grad"].untyped_storage().data_ptr()
        assert p.stride() == strides[n], "memory format must be kept"
        assert p.data_ptr() % 64 == 0
        assert torch.equal(p, before[n])
    assert flat["param"].numel() >= D_PARAMS and flat["param"].is_contiguous()


def test_backward_lands_in_flat_grad_and_zero_grad_keeps_views():
    net = Discriminator()
    opt = FusedAdam(net.parameters())
    grads = [p.grad for p in net.parameters()]
    x = torch.randn(4, 3, 64, 64)
    F.binary_cross_entropy_with_logits(net.logits(x), torch.ones(4)).backward()
    flat_grad = opt.flat_buffers()["grad"]
    assert flat_grad.abs().sum() > 0
    for p, g in zip(net.parameters(), grads):
        assert p.grad is g
    opt.zero_grad(set_to_none=True)  # zeroes in place, keeps the views
    assert flat_grad.abs().sum() == 0
    for p, g in zip(net.parameters(), grads):
        assert p.grad is g


def test_module_zero_grad_set_to_none_is_repaired():
    """module.zero_grad() sets grads to None; backward then allocates new tensors: step copies
    them into the flat buffer and points p.grad back at its view."""
    a, fa, b, ta = _pair("D", "cpu")
    x = torch.randn(4, 3, 64, 64)
    for _ in range(3):
        for net, opt in ((a, fa), (b, ta)):
            net.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(net.logits(x), torch.ones(4)).backward()
            opt.step()
    _assert_same(a, fa, b, ta, tol=dict(rtol=1e-4, atol=1e-6))
    flat_grad = fa.flat_buffers()["grad"]
    for p in a.parameters():
        assert p.grad.untyped_storage().data_ptr() == flat_grad.untyped_storage().data_ptr()


def test_all_grads_none_skips_the_step():
    net = Discriminator()
    opt = FusedAdam(net.parameters())
    for p in net.parameters():
        p.grad = None
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert float(opt.flat_buffers()["step"]) == 0.0
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert all(p.grad is not None for p in net.parameters())  # views restored


def test_some_grads_none_count_as_zero():
    net = Discriminator()
    opt = FusedAdam(net.parameters())
    params = list(net.parameters())
    for p in params:
        p.grad.normal_()
    params[0].grad = None
    opt.step()
    assert torch.equal(opt.state[params[0]]["exp_avg"], torch.zeros_like(params[0]))
    assert params[0].grad is not None and params[0].grad.abs().sum() == 0


def test_replaced_parameter_storage_raises():
    net = Discriminator()
    opt = FusedAdam(net.parameters())
    p = next(net.parameters())
    p.data = p.data.clone()
    with pytest.raises(RuntimeError, match="no longer lives in the optimizer's flat buffer"):
        opt.step()


def test_in_place_parameter_writes_are_kept():
    a, fa, b, ta = _pair("D", "cpu")
    a.load_state_dict(b.state_dict())  # copy_ into the views
    _run(a, fa, b, ta, 3)
    _assert_same(a, fa, b, ta)


def test_multiple_groups_with_their_own_hyperparameters():
    a, b = Generator(), None
    b = copy.deepcopy(a)
    def groups(net, lr2):
        convs = [p for n, p in net.named_parameters() if p.dim() == 4]
        norms = [p for n, p in net.named_parameters() if p.dim() == 1]
        return [{"params": convs}, {"params": norms, "lr": lr2, "weight_decay": 0.5}]
    fa = FusedAdam(groups(a, 1e-2))
    ta = torch.optim.Adam(groups(b, 1e-2), lr=2e-4, betas=(0.5, 0.999))
    _run(a, fa, b, ta, 5)
    _assert_same(a, fa, b, ta)
    assert fa.flat_buffers(1)["param"].numel() < fa.flat_buffers(0)["param"].numel()


def test_unsupported_features_raise():
    net = Discriminator()
    with pytest.raises(NotImplementedError, match="amsgrad"):
        FusedAdam(net.parameters(), amsgrad=True)
    with pytest.raises(NotImplementedError, match="maximize"):
        FusedAdam(net.parameters(), maximize=True)
    with pytest.raises(TypeError, match="float32"):
        FusedAdam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="does not require grad"):
        FusedAdam([torch.zeros(3)])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        FusedAdam(net.parameters(), lr=-1)
    opt = FusedAdam(net.parameters())
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(NotImplementedError, match="amsgrad"):
        opt.step()


def test_state_dict_round_trip_through_torch_save():
    a, fa, b, ta = _pair("G", "cpu")
    _run(a, fa, b, ta, 5)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "optim": fa.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = Generator()
    c.load_state_dict(ckpt["model"])
    fc = FusedAdam(c.parameters())
    fc.load_state_dict(ckpt["optim"])
    assert float(fc.flat_buffers()["step"]) == 5.0
    # continuing from the checkpoint is bit-identical to continuing the original
    pa, pc = list(a.parameters()), list(c.parameters())
    for s in range(5):
        for p, q, g in zip(pa, pc, _grads(pa, "random", s)):
            p.grad.copy_(g)
            q.grad.copy_(g)
        fa.step()
        fc.step()
    for p, q in zip(pa, pc):
        assert torch.equal(p, q)
        assert torch.equal(fa.state[p]["exp_avg_sq"], fc.state[q]["exp_avg_sq"])


def test_state_dict_has_torch_adam_format():
    a, fa, b, ta = _pair("D", "cpu")
    _run(a, fa, b, ta, 2)
    sa, sb = fa.state_dict(), ta.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sb["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        assert sa["state"][k]["step"].shape == () and sa["state"][k]["step"].device.type == "cpu"
    assert sa["param_groups"][0]["params"] == sb["param_groups"][0]["params"]


def test_resumes_from_torch_adam_state_dict():
    """An old checkpoint written with torch.optim.Adam loads into FusedAdam and continues."""
    a, fa, b, ta = _pair("D", "cpu")
    _run(a, fa, b, ta, 4)  # trains both; FusedAdam's own state is then overwritten
    a.load_state_dict(b.state_dict())
    buf = io.BytesIO()
    torch.save(ta.state_dict(), buf)
    buf.seek(0)
    fa.load_state_dict(torch.load(buf, weights_only=True))
    assert float(fa.flat_buffers()["step"]) == 4.0
    _assert_same(a, fa, b, ta, tol=dict(rtol=0, atol=0))
    _run(a, fa, b, ta, 6)
    _assert_same(a, fa, b, ta)


def test_torch_adam_loads_fused_adam_state_dict():
    a, fa, b, ta = _pair("D", "cpu")
    _run(a, fa, b, ta, 4)
    b.load_state_dict(a.state_dict())
    ta.load_state_dict(copy.deepcopy(fa.state_dict()))
    _run(a, fa, b, ta, 6)
    _assert_same(a, fa, b, ta)


def test_fresh_torch_adam_state_dict_loads():
    a, fa, b, ta = _pair("D", "cpu")
    fa.load_state_dict(ta.state_dict())  # no state yet
    assert float(fa.flat_buffers()["step"]) == 0.0
    _run(a, fa, b, ta, 3)
    _assert_same(a, fa, b, ta)


def test_loading_mixed_step_counts_raises():
    a, fa, b, ta = _pair("D", "cpu")
    _run(a, fa, b, ta, 2)
    sd = ta.state_dict()
    sd["state"][0]["step"] = torch.tensor(7.0)
    with pytest.raises(ValueError, match="different step counts"):
        fa.load_state_dict(sd)


# -- the op itself --------------------------------------------------------------------------------

def _op_args(n, device, sync=True):
    p, m = torch.randn(n, device=device), torch.randn(n, device=device) * 0.1
    v, g = torch.rand(n, device=device) * 0.01, torch.randn(n, device=device)
    step = torch.tensor(3.0, device=device)
    s = torch.zeros(1, dtype=torch.int32, device=device) if sync else None
    return (p, g, m, v, step, 1e-3, 0.9, 0.999, 1e-8, 0.01, s)


def _reference_adam(p, g, m, v, step, lr, b1, b2, eps, wd):
    """torch.optim.Adam's single-tensor formulas, in float64."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    t = float(step) + 1
    g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr / (1 - b1 ** t) * m / (v.sqrt() / (1 - b2 ** t) ** 0.5 + eps)
    return p, m, v, t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 3, 4, 1023, 70_001])
@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
def test_adam_step_op_vs_float64(device, n, sync, offset):
    """Sizes around the vector width, and misaligned buffers (offset 1: scalar path on CUDA)."""
    args = list(_op_args(n + offset, device, sync))
    for i in range(4):
        args[i] = args[i][offset:]
    ref = _reference_adam(*args[:10])
    _ext.ops().adam_step(*args)
    p, g, m, v, step = args[:5]
    torch.testing.assert_close(p.double(), ref[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.double(), ref[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v.double(), ref[2], rtol=1e-6, atol=1e-9)
    assert float(step) == ref[3]
    if sync:
        assert int(args[10]) == 0  # the block counter is left armed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [3, 1023, 70_001])
@pytest.mark.parametrize("offset", [0, 1])
def test_adam_step_writes_the_bf16_copy(device, n, offset):
    """param_copy gets the updated parameters rounded to nearest even, bit for bit what
    .to(torch.bfloat16) gives (NaN: a NaN), on the vector and scalar paths (offset 1:
    misaligned), including values halfway between two bf16 numbers, infinities and NaN; the
    update itself is unchanged."""
    args = list(_op_args(n + offset, device))
    for i in range(4):
        args[i] = args[i][offset:]
    plain = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    # with lr 0 the parameters stay as set: ties (bf16 ulp halves), +-inf and NaN included
    args[5] = plain[5] = 0.0
    args[9] = plain[9] = 0.0
    special = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), float("inf"),
                            float("-inf"), float("nan"), 3e38, -0.0], device=device)
    k = min(n, special.numel())
    args[0][:k] = special[:k]
    plain[0][:k] = special[:k]
    copy = torch.full((n,), 7.0, dtype=torch.bfloat16, device=device)
    _ext.ops().adam_step(*args, param_copy=copy)
    _ext.ops().adam_step(*plain)
    assert torch.equal(args[0].nan_to_num(), plain[0].nan_to_num())
    want = args[0].to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(copy.isnan(), nan) and nan.sum() == (n >= 6)
    assert torch.equal(copy[~nan].view(torch.int16), want[~nan].view(torch.int16))
    # and a real update (lr, weight decay) writes the new parameters
    args = list(_op_args(n, device))
    copy = torch.empty(n, dtype=torch.bfloat16, device=device)
    _ext.ops().adam_step(*args, param_copy=copy)
    assert torch.equal(copy.view(torch.int16), args[0].to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_adam_step_op_checks_arguments(device):
    p, g, m, v, step, *rest = _op_args(8, device)
    adam = _ext.ops().adam_step
    with pytest.raises(RuntimeError, match="exp_avg has 7 elements"):
        adam(p, g, m[:7], v, step, *rest)
    with pytest.raises(RuntimeError, match="must be float32"):
        adam(p, g.double(), m, v, step, *rest)
    with pytest.raises(RuntimeError, match="contiguous"):
        adam(p, torch.randn(16, device=device)[::2], m, v, step, *rest)
    with pytest.raises(RuntimeError, match="step must be a float32"):
        adam(p, g, m, v, step.long(), *rest)
    with pytest.raises(RuntimeError, match="param_copy must be bfloat16, got Half"):
        adam(p, g, m, v, step, *rest, param_copy=torch.empty(8, dtype=torch.half, device=device))
    with pytest.raises(RuntimeError, match="param_copy has 7 elements, param has 8"):
        adam(p, g, m, v, step, *rest, param_copy=torch.empty(7, dtype=torch.bfloat16, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sync", [True, False])
def test_adam_step_opcheck(device, sync):
    torch.library.opcheck(torch.ops.fastdcgan.adam_step.default, _op_args(1000, device, sync))
    copy = torch.empty(1000, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.fastdcgan.adam_step.default, _op_args(1000, device, sync),
                          {"param_copy": copy})


def test_extension_is_built_from_these_sources(tmp_path):
    mod = _ext.load()
    assert mod.source_hash == "h" + _ext.csrc_source_hash()
    assert mod.with_cuda in (True, False)
    if CUDA:
        assert mod.with_cuda, "torch sees a GPU but fastdcgan._C was built without CUDA"
    # a stale build (sources edited after building) is refused with the command that rebuilds it
    root = os.path.dirname(os.path.dirname(os.path.abspath(_ext.__file__)))
    shutil.copytree(os.path.join(root, "csrc"), tmp_path / "csrc")
    with open(tmp_path / "csrc" / "fastdcgan.h", "a") as fh:
        fh.write("\n// edited\n")
    with pytest.raises(_ext.ExtensionError, match="stale.*pip install --no-build-isolation -e"):
        _ext.check_built_from(mod, str(tmp_path))
    assert _ext.csrc_source_hash(str(tmp_path / "nowhere")) is None  # installed package: no check


# -- CUDA only: one launch per network, CUDA-graph capture ---------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("net", ["G", "D"])
def test_cuda_one_kernel_per_network(net):
    a, fa, b, ta = _pair(net, "cuda")
    _run(a, fa, b, ta, 2)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fa.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_capture_replays_steps():
    a, fa, b, ta = _pair("D", "cuda")
    _run(a, fa, b, ta, 2)  # warm up outside the graph
    pa, pb = list(a.parameters()), list(b.parameters())
    static_grads = [torch.zeros_like(p) for p in pa]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for p, g in zip(pa, static_grads):
                p.grad.copy_(g)
            fa.step()
    torch.cuda.current_stream().wait_stream(side)
    for s in range(6):
        grads = _grads(pb, "random", s)
        for sg, g, p in zip(static_grads, grads, pb):
            sg.copy_(g)
            p.grad = g.clone()
        graph.replay()
        ta.step()
    torch.cuda.synchronize()
    _assert_same(a, fa, b, ta)
    assert float(fa.flat_buffers()["step"]) == 8.0
