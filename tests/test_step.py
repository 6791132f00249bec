"""The training step (fastdcgan.step): GanStep against the pytorch/examples loop written out with
torch.optim.Adam and nn.BCELoss (CPU), and on a GPU the CUDA-graph-captured step against the
uncaptured one and against the reference backend, in fp32 and bf16."""
import copy

import pytest
import torch
from torch import nn

from fastdcgan import Discriminator, Generator
from fastdcgan.data import EpochBatches, load_dataset
from fastdcgan.optim import FusedAdam
from fastdcgan.step import CapturedStep, EagerStep, GanStep, _frozen
from precision import CUDA, interpreter_only, needs_cuda, rel_err

NZ = 16


def _models(ngf, ndf, backend, device, seed=0):
    torch.manual_seed(seed)
    G = Generator(nz=NZ, ngf=ngf, backend=backend).to(device)
    D = Discriminator(ndf=ndf, backend=backend).to(device)
    return G, D


def _batches(batch, device, n=256):
    images = load_dataset("synthetic", size=64, n=n).images
    return EpochBatches(images, batch, seed=0, device=device)


def _examples_step(netG, netD, optG, optD, real, z):
    """pytorch/examples/dcgan/main.py's loop body (sigmoid D, BCELoss, D's G-step grads kept)."""
    criterion = nn.BCELoss()
    b = real.shape[0]
    netD.zero_grad()
    out_real = netD(real)
    err_real = criterion(out_real, torch.full((b,), 1.0))
    err_real.backward()
    fake = netG(z)
    out_fake = netD(fake.detach())
    err_fake = criterion(out_fake, torch.full((b,), 0.0))
    err_fake.backward()
    optD.step()
    netG.zero_grad()
    out_gen = netD(fake)
    err_g = criterion(out_gen, torch.full((b,), 1.0))
    err_g.backward()
    optG.step()
    return {"loss_d": err_real + err_fake, "loss_g": err_g, "d_x": out_real.mean(),
            "d_g_z": out_fake.mean(), "d_g_z_after": out_gen.mean()}


@pytest.mark.parametrize("optimizer, steps", [("adam", 1), ("sgd", 2)])
def test_gan_step_matches_the_pytorch_examples_loop(optimizer, steps):
    """Adam for one step only: its update is ~lr*sign(grad), so after that, elements whose
    gradient is at rounding level move by a whole lr either way. SGD for two (the second sees D's
    state after a G update with D frozen); from the third step on, rounding differences (BCE
    from logits vs BCELoss on sigmoid) grow chaotically, with or without the freeze."""
    G, D = _models(8, 8, "reference", "cpu")
    Ge, De = copy.deepcopy(G), copy.deepcopy(D)
    if optimizer == "adam":
        opts = [FusedAdam(m.parameters()) for m in (G, D)]
        opts_e = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999)) for m in (Ge, De)]
    else:
        opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (G, D)]
        opts_e = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (Ge, De)]
    step = GanStep(G, D, *opts)
    batches = _batches(8, "cpu")
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        real = batches.next_batch()
        z = torch.randn(8, NZ, 1, 1, generator=gen)
        stats = step(real, z)
        want = _examples_step(Ge, De, *opts_e, real, z)
        assert stats.keys() == want.keys()
        for k, v in want.items():   # the losses and the mean D outputs of the fused loss kernel
            assert stats[k].dtype == torch.float32 and stats[k].shape == (), k
            assert stats[k].item() == pytest.approx(v.item(), rel=1e-5), k
    for m, me in ((G, Ge), (D, De)):
        for (name, a), (_, b) in zip(m.state_dict().items(), me.state_dict().items()):
            if a.is_floating_point():
                assert rel_err(a, b) < 1e-5, name
            else:
                assert torch.equal(a, b), name
    # D was frozen for the G update only
    assert all(p.requires_grad for p in D.parameters())


# ops that only make or reshape tensor metadata (no kernel on a GPU)
_NO_KERNEL = {"aten.empty", "aten.empty_strided", "aten.as_strided", "aten.permute", "aten.view",
              "aten.detach", "aten.transpose", "aten.slice", "aten.select", "aten.split",
              "aten.alias", "aten._unsafe_view", "aten.t", "aten.expand", "aten.unsqueeze",
              "aten.squeeze", "aten.new_empty", "aten.new_empty_strided", "aten.set_",
              "profiler._record_function_enter_new", "profiler._record_function_exit"}


def _kernel_ops(fn):
    """fn()'s result and the ops it ran that launch a kernel on a GPU, by name (the Triton
    interpreter's own tensor work inside a kernel launch left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    ops, inside, run = {}, [], InterpretedFunction.run

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if not inside and name not in _NO_KERNEL:
                ops[name] = ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    def launch(self, *args, **kwargs):
        inside.append(1)
        try:
            return run(self, *args, **kwargs)
        finally:
            inside.pop()

    InterpretedFunction.run = launch
    try:
        with Count():
            out = fn()
    finally:
        InterpretedFunction.run = run
    return out, ops


@interpreter_only
def test_triton_step_matches_the_reference_backend(monkeypatch):
    """GanStep with the triton backend (interpreter: weights read in place in kernel layout, D
    scoring real and fake in one grouped pass, D's gradients accumulated by the kernels into
    FusedAdam's buffers, BN counters bumped by the finalize kernel) against the reference backend
    from the same weights and batches, over two steps: losses, every gradient, the updated
    parameters and BN buffers. Batch 16: the smallest whose D pass groups (16 images a group).

    The second step also counts what it launches besides the Triton kernels: only the two fused
    losses (each giving its loss, gradient and mean D outputs), the two Adam updates and the two
    gradient zeroings, the cat of D's [real; fake] input, and the K-major fp32 weight copies the
    TF32 forward GEMMs read (one per conv and D/G pass: 4 + 4 + 4). A new aten kernel in the
    step (glue around the losses, a cast, a layout copy) shows up there."""
    from fastdcgan.kernels import network

    groups_run, run_network = [], network.run_network

    def recording(x, specs, tensors, groups=1):
        groups_run.append(groups)
        return run_network(x, specs, tensors, groups)

    monkeypatch.setattr(network, "run_network", recording)
    G, D = _models(2, 2, "triton", "cpu")
    Gr, Dr = _models(2, 2, "reference", "cpu")
    Gr.load_state_dict(G.state_dict())
    Dr.load_state_dict(D.state_dict())
    ours = GanStep(G, D, FusedAdam(G.parameters()), FusedAdam(D.parameters()))
    ref = GanStep(Gr, Dr, FusedAdam(Gr.parameters()), FusedAdam(Dr.parameters()))
    batches = _batches(16, "cpu", n=64)
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        # channels_last, as the GPU's gather gives it (no NHWC copy at D's input)
        real = batches.next_batch().contiguous(memory_format=torch.channels_last)
        z = torch.randn(16, NZ, 1, 1, generator=gen)
        stats, ops = _kernel_ops(lambda: ours(real, z))
        stats_ref = ref(real, z)
        if i == 1:
            assert ops == {"fastdcgan.bce_with_logits": 2, "fastdcgan.adam_step": 2,
                           "aten.zero_": 2, "aten.cat": 1, "aten.clone": 12}
        for k in stats:
            assert rel_err(stats[k], stats_ref[k]) < 1e-5, k
        # after the step: G's grads are loss_g's, D's loss_d's (D is frozen for the G update)
        for m, mr in ((G, Gr), (D, Dr)):
            for (name, a), (_, b) in zip(m.named_parameters(), mr.named_parameters()):
                assert rel_err(a.grad, b.grad) < 1e-4, f"grad {name}"
                assert rel_err(a, b) < 1e-5, name
            for (name, a), (_, b) in zip(m.named_buffers(), mr.named_buffers()):
                assert (rel_err(a, b) < 1e-5) if a.is_floating_point() else torch.equal(a, b), name
    assert int(G.main[1].num_batches_tracked) == 2 and int(D.main[3].num_batches_tracked) == 6
    assert groups_run == [1, 2, 1] * 2   # per step: G(z), D(real, fake) grouped, D(G(z))


def test_the_batch_is_gathered_in_the_networks_dtype():
    """A bf16 step on CUDA gathers its real batch in bf16 (the first layer's dtype: no cast
    launch in the step); fp32 steps, and any step on a CPU (no CPU autocast here), in fp32."""
    G, D = _models(2, 2, "reference", "cpu")
    for precision, device, want in [("fp32", "cuda", torch.float32), ("bf16", "cuda", torch.bfloat16),
                                    ("bf16", "cpu", torch.float32), ("fp32", "cpu", torch.float32)]:
        step = GanStep(G, D, None, None, precision=precision)
        assert step.batch_dtype(torch.device(device)) == want, (precision, device)
    batches = _batches(4, "cpu", n=8)
    seen = []
    step = GanStep(G, D, None, None, precision="bf16")
    step._step = lambda real, z: seen.append(real.dtype)
    EagerStep(step, batches, torch.Generator().manual_seed(0), NZ)()
    assert seen == [torch.float32]


def test_frozen_restores_requires_grad_after_an_error():
    D = Discriminator(ndf=4)
    with pytest.raises(KeyError):
        with _frozen(D):
            assert not any(p.requires_grad for p in D.parameters())
            raise KeyError("boom")
    assert all(p.requires_grad for p in D.parameters())


def test_captured_step_needs_cuda_data():
    G, D = _models(4, 4, "reference", "cpu")
    step = GanStep(G, D, FusedAdam(G.parameters()), FusedAdam(D.parameters()))
    with pytest.raises(ValueError, match="CUDA"):
        CapturedStep(step, _batches(4, "cpu", n=16), torch.Generator(), NZ)


# -- GPU: the captured step ----------------------------------------------------------------------

def _setup(backend, precision, batch=64, seed=0):
    G, D = _models(64, 64, backend, "cuda", seed)
    step = GanStep(G, D, FusedAdam(G.parameters()), FusedAdam(D.parameters()), precision=precision)
    return step, _batches(batch, "cuda", n=512), torch.Generator(device="cuda").manual_seed(1)


def _params(step):
    return [p.detach().clone() for p in (*step.G.parameters(), *step.D.parameters())]


def _perturb(step):
    """The same in-place change of every parameter in each run (as a load_state_dict would)."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    with torch.no_grad():
        for p in (*step.G.parameters(), *step.D.parameters()):
            p.add_(torch.randn(p.shape, device="cuda", generator=gen), alpha=0.05)


def _run(backend, precision, captured, steps=5, perturb_after=None):
    """Per-step statistics and each network's total parameter update over `steps` steps
    (perturb_after: the parameters are changed in place after that many steps)."""
    step, batches, noise = _setup(backend, precision)
    start = _params(step)
    runner = CapturedStep(step, batches, noise, NZ, warmup=2) if captured else EagerStep(step, batches, noise, NZ)
    stats = []
    for i in range(steps):
        if i == perturb_after:
            _perturb(step)
        stats.append({k: v.clone() for k, v in runner().items()})
    if captured:
        assert runner.graph is not None
    update = torch.cat([(a - b).flatten() for a, b in zip(_params(step), start)]).double()
    return stats, update


def _cos(a, b):
    return (a @ b / (a.norm() * b.norm())).item()


def _assert_agrees(ours, eager, again, floor, min_cos):
    """ours = (stats, update) agrees with an eager run as closely as a second eager run `again`
    does (or within the floor), and moves the parameters the same way."""
    (stats, update), (eager_stats, eager_update), (again_stats, again_update) = ours, eager, again
    for i, (a, b, c) in enumerate(zip(eager_stats, again_stats, stats)):
        for k in a:
            assert rel_err(c[k], a[k]) <= max(floor, 4 * rel_err(b[k], a[k])), (i, k)
    assert _cos(update, eager_update) >= min(min_cos, _cos(again_update, eager_update) - 0.02)


@needs_cuda
def test_a_bf16_step_reads_its_weights_from_fused_adams_copies(monkeypatch):
    """A bf16 triton step casts no weights: each pass's bf16 kernel weights are views of the
    copies FusedAdam writes in its update launch, equal to the fp32 weights rounded to bf16."""
    from fastdcgan.kernels import weights

    found, provided = [], weights._provided

    def recording(views, lo, hi, dtype):
        out = provided(views, lo, hi, dtype)
        found.append(out is not None and all(torch.equal(o, v.to(dtype)) for o, v in zip(out, views)))
        return out

    monkeypatch.setattr(weights, "_provided", recording)
    step, batches, noise = _setup("triton", "bf16")
    runner = EagerStep(step, batches, noise, NZ)
    for _ in range(3):
        runner()
    assert found == [True] * 9   # per step: G(z), D(real, fake), D(G(z))


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("precision, floor, min_cos", [("fp32", 2e-2, 0.99), ("bf16", 3e-2, 0.95)])
def test_captured_step_equals_uncaptured(backend, precision, floor, min_cos):
    """Same weights, batches and noise: 2 warm-up steps, capture, 3 replays vs 5 eager steps.
    Two eager runs already differ (the split-K weight gradients and cuDNN add partials with
    atomics) and a GAN amplifies that within steps (D(G(z)) ~ 1e-2 here), so the captured run
    must agree with an eager run as closely as a second eager run does (or within the floor),
    and move the parameters the same way. The fp32 floor: on the H100 the captured reference
    (cuDNN, TF32) step's D(G(z)) was 1.6% off the eager one at the fifth step, where a second
    eager run was 0.4% off."""
    eager = _run(backend, precision, captured=False)
    again = _run(backend, precision, captured=False)
    _assert_agrees(_run(backend, precision, captured=True), eager, again, floor, min_cos)


@needs_cuda
def test_a_captured_bf16_step_follows_parameters_changed_between_replays():
    """Parameters changed in place between replays (3 steps, then a change, then 2 more) reach
    the graph's bf16 weight copies before the next replay: the captured run agrees with eager
    runs that make the same change."""
    eager = _run("triton", "bf16", captured=False, perturb_after=3)
    again = _run("triton", "bf16", captured=False, perturb_after=3)
    _assert_agrees(_run("triton", "bf16", captured=True, perturb_after=3), eager, again, 3e-2, 0.95)


@needs_cuda
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm_90+")
def test_captured_step_with_pdl_equals_uncaptured(monkeypatch):
    """FASTDCGAN_PDL=1 (kernels/pdl.py): the captured bf16 step, whose graph then has
    programmatic edges (each kernel launched before its predecessor ends, waiting for it on the
    GPU), agrees with eager steps without PDL as closely as two of those do."""
    eager = _run("triton", "bf16", captured=False)
    again = _run("triton", "bf16", captured=False)
    monkeypatch.setenv("FASTDCGAN_PDL", "1")
    _assert_agrees(_run("triton", "bf16", captured=True), eager, again, 3e-2, 0.95)


@needs_cuda
def test_captured_step_with_a_wgrad_stream_equals_uncaptured(monkeypatch):
    """FASTDCGAN_WGRAD_STREAM=1 (kernels/block.py): the captured bf16 step, whose graph then has
    the weight gradients on a branch of their own, joined before each optimizer step, agrees with
    one-stream eager steps as closely as two of those do (the streams' order does not depend on
    the dtype; test_models_triton checks the gradients themselves in both)."""
    eager = _run("triton", "bf16", captured=False)
    again = _run("triton", "bf16", captured=False)
    monkeypatch.setenv("FASTDCGAN_WGRAD_STREAM", "1")
    _assert_agrees(_run("triton", "bf16", captured=True), eager, again, 3e-2, 0.95)


@needs_cuda
@pytest.mark.parametrize("precision, tol", [("fp32", 3e-2), ("bf16", 1e-1)])
def test_captured_triton_step_tracks_the_reference_backend(precision, tol):
    """The captured fused step vs the eager cuDNN step from the same weights: the step statistics
    agree within tol, and the parameter updates point the same way (Adam's first steps are
    ~lr*sign(grad), so elements whose gradient is below the precision's noise may flip: compare
    the update direction, not elementwise)."""
    ref, batches_r, noise_r = _setup("reference", precision)
    ours, batches, noise = _setup("triton", precision)
    start = _params(ours)
    captured = CapturedStep(ours, batches, noise, NZ, warmup=1)
    eager = EagerStep(ref, batches_r, noise_r, NZ)
    for i in range(2):
        stats_r = eager()
        stats = captured()
        for k in stats:
            assert rel_err(stats[k], stats_r[k]) < tol, (i, k, rel_err(stats[k], stats_r[k]))
    for p0, a, b in zip(start, _params(ours), _params(ref)):
        cos = _cos((a - p0).flatten().double(), (b - p0).flatten().double())
        assert cos > 0.9, cos


@needs_cuda
def test_hundreds_of_captured_steps_improve_the_samples(tmp_path):
    from fastdcgan.evaluate import evaluate_generator
    from fastdcgan.train import TrainConfig, Trainer

    cfg = TrainConfig(steps=800, batch_size=128, num_images=4096, out=str(tmp_path), device="cuda",
                      backend="triton", cuda_graph=True, sample_every=400, ckpt_every=800, log_every=40)
    trainer = Trainer(cfg, progress=False)
    real = trainer._real_images(512, 4)
    before = evaluate_generator(trainer.G, real, seed=0)["swd_avg"]
    trainer.run()
    assert isinstance(trainer._step, CapturedStep) and trainer._step.graph is not None
    after = evaluate_generator(trainer.G, real, seed=0)["swd_avg"]
    rows = trainer.log_rows
    assert len(rows) >= 15 and all(torch.isfinite(torch.tensor([r["loss_d"], r["loss_g"]])).all() for r in rows)
    assert (tmp_path / "fake_samples_step_000800.png").exists() and (tmp_path / "losses.png").exists()
    # measured: 265 -> 226 after 300 steps (the paper's lr 2e-4 starts slowly)
    assert after < 0.8 * before, (before, after)
