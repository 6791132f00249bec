"""Data-parallel training on CPU with gloo: two ranks against one process, sync BN (both
backends), resume across world sizes, and a rank that dies or stalls.

The two-rank runs happen once per module (`two_ranks`, torch.multiprocessing spawn) and save what
the tests compare; the signal and dead-rank tests launch the CLI as two processes with torchrun's
environment variables.
"""
import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from fastdcgan import Discriminator, checkpoint, distributed
from fastdcgan.kernels import weights
from fastdcgan.loss import bce_with_logits
from fastdcgan.train import TrainConfig, Trainer, main
from precision import rel_err

WORLD = 2
BATCH = 4  # per rank
TINY = dict(num_images=48, ngf=8, ndf=8, nz=16, num_samples=8, log_every=1, sample_every=1000,
            ckpt_every=1000, device="cpu", backend="reference")
STEPS = 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp, name, **kw):
    return TrainConfig(**{**TINY, "batch_size": BATCH, "steps": STEPS, "out": str(tmp / name), **kw})


def _state(trainer, **extra):
    return {"G": trainer.G.state_dict(), "D": trainer.D.state_dict(), "step": trainer.step,
            "batches": trainer.batches.state_dict(), **extra}


# ---- the two-rank session (runs in the spawned processes) ----------------------------------
def _per_rank_bn(rank, tmp):
    """STEPS steps with per-rank BN; D's gradient right after the first all-reduce is kept."""
    trainer = Trainer(_config(tmp, f"per_rank_out{rank}"), progress=False)
    average, first_d_grad = trainer.gan_step.grad_sync, []
    assert average is distributed.average_gradients

    def recording(opt):
        average(opt)
        if opt is trainer.optD and not first_d_grad:
            first_d_grad.extend(p.grad.clone() for p in trainer.D.parameters())

    trainer.gan_step.grad_sync = recording
    trainer.run()
    return _state(trainer, first_d_grad=first_d_grad)


def _sync_bn(rank, tmp):
    trainer = Trainer(_config(tmp, f"sync_out{rank}", sync_bn=True), progress=False)
    trainer.train_step()
    return _state(trainer)


def _resume_from_one_process(rank, tmp):
    trainer = Trainer(resume=tmp / "one_process" / "checkpoint.pt", progress=False,
                      overrides={"steps": STEPS + 2, "out": str(tmp / f"resumed_1_to_2_out{rank}")})
    resumed_at = trainer.batches.state_dict()
    trainer.run()
    return _state(trainer, resumed_at=resumed_at)


def _triton_layers(backend):
    """D's first three blocks (two with BN) on 16x16 inputs: small enough for the interpreter,
    and the chained backward reduces one BN's sums in the next block's dgrad epilogue."""
    torch.manual_seed(0)
    D = Discriminator(ndf=4, backend=backend)
    return D, lambda x: D._run(x, D.main[:8])


def _triton_sync_bn(rank, tmp):
    """Forward and backward through the fused kernels (interpreter) on this rank's half of the
    batch saved by the test, gradients averaged over the ranks: once returned through autograd,
    once (a copy of the same layers) accumulated by the kernels into zeroed .grad buffers, as
    inside a training step (kernels.weights.training_step)."""
    from fastdcgan.kernels import network

    inputs = torch.load(tmp / "triton_inputs.pt", weights_only=True)
    D, _ = _triton_layers("triton")
    D_fused = copy.deepcopy(D)
    sinks = []   # the gradient buffers the kernels accumulated into
    network.grad_sink = lambda *a, f=network.grad_sink: sinks.append(f(*a)) or sinks[-1]
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    out = {}
    for key, model, scope in (("grads", D, contextlib.nullcontext()),
                              ("grads_fused", D_fused, weights.training_step())):
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if key == "grads_fused" else None
        distributed.use_sync_batchnorm((model,), True)
        try:
            with scope:
                (model._run(inputs["x"][half], model.main[:8]) * inputs["w"][half]).sum().backward()
        finally:
            distributed.use_sync_batchnorm((model,), False)
        out[key] = {}
        for name, p in model.named_parameters():
            if p.grad is not None and (key == "grads" or p.grad.any()):
                torch.distributed.all_reduce(p.grad)
                out[key][name] = p.grad / WORLD
    return {**out, "sinks": sum(t is not None for t in sinks), "D": D.state_dict()}


def _mismatched_config(rank, tmp):
    try:
        Trainer(_config(tmp, "mismatch", seed=rank), progress=False)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


JOBS = {"per_rank_bn": _per_rank_bn, "mismatched_config": _mismatched_config, "sync_bn": _sync_bn,
        "resume_from_one_process": _resume_from_one_process, "triton_sync_bn": _triton_sync_bn}


def _rank_main(rank, port, tmp):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      FASTDCGAN_CACHE=str(tmp / "cache"))
    torch.set_num_threads(1)
    distributed.init_from_env(timeout_s=120)
    try:
        for name, job in JOBS.items():
            torch.save(job(rank, tmp), tmp / f"{name}.rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs every job of JOBS on two ranks; returns {job: [rank 0's result, rank 1's]} and tmp."""
    tmp = tmp_path_factory.mktemp("ddp")
    cache = os.environ.get("FASTDCGAN_CACHE")
    os.environ["FASTDCGAN_CACHE"] = str(tmp / "cache")
    one_process = Trainer(_config(tmp, "one_process"), progress=False)   # resumed by the two ranks
    for _ in range(STEPS):
        one_process.train_step()
    one_process.save_checkpoint()
    torch.manual_seed(1)
    torch.save({"x": torch.randn(BATCH, 3, 16, 16), "w": torch.randn(BATCH, 16, 2, 2)},
               tmp / "triton_inputs.pt")
    mp.spawn(_rank_main, args=(_free_port(), tmp), nprocs=WORLD, join=True)
    results = {name: [torch.load(tmp / f"{name}.rank{r}.pt", weights_only=True) for r in range(WORLD)]
               for name in JOBS}
    yield results, tmp
    if cache is None:
        del os.environ["FASTDCGAN_CACHE"]
    else:
        os.environ["FASTDCGAN_CACHE"] = cache


def _assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


# ---- the tests ------------------------------------------------------------------------------
def test_ranks_keep_bit_identical_parameters_with_per_rank_bn(two_ranks):
    results, _ = two_ranks
    r0, r1 = results["per_rank_bn"]
    assert r0["step"] == r1["step"] == STEPS
    for net in ("G", "D"):
        weights = [k for k in r0[net] if k.endswith(("weight", "bias"))]
        _assert_same({k: r0[net][k] for k in weights}, {k: r1[net][k] for k in weights}, rtol=0, atol=0)
    # each rank normalised its own shard: the running statistics differ
    assert not torch.equal(r0["D"]["main.3.running_mean"], r1["D"]["main.3.running_mean"])


def test_allreduced_gradient_is_the_mean_of_the_shard_gradients(two_ranks, tmp_path):
    results, _ = two_ranks
    # One process, one global batch: each rank's shard and latents by hand, per-shard BN.
    ref = Trainer(_config(tmp_path, "ref", batch_size=BATCH * WORLD), progress=False)
    real = ref.batches.next_batch()
    z = torch.randn(BATCH * WORLD, TINY["nz"], 1, 1, generator=ref.noise)
    shard_grads = []
    for r in range(WORLD):
        shard = slice(r * BATCH, (r + 1) * BATCH)
        fake = ref.G(z[shard])
        loss_d = (bce_with_logits(ref.D.logits(real[shard]), 1.0)
                  + bce_with_logits(ref.D.logits(fake.detach()), 0.0))
        shard_grads.append(torch.autograd.grad(loss_d, list(ref.D.parameters())))
    expected = [torch.stack(g).mean(0) for g in zip(*shard_grads)]
    for rank_result in results["per_rank_bn"]:
        got = rank_result["first_d_grad"]
        assert len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"D parameter {i}")
    # the shards' gradients really differ: averaging is not a no-op
    assert not torch.allclose(shard_grads[0][0], shard_grads[1][0], rtol=1e-2)


def test_sync_bn_step_equals_the_one_process_step_on_the_whole_batch(two_ranks, tmp_path):
    results, _ = two_ranks
    r0, r1 = results["sync_bn"]
    ref = Trainer(_config(tmp_path, "ref", batch_size=BATCH * WORLD), progress=False)
    ref.train_step()
    lr = ref.config.lr
    for net, module in (("G", ref.G), ("D", ref.D)):
        _assert_same(r0[net], r1[net], rtol=0, atol=0)   # running stats too: they are global
        expected = module.state_dict()
        assert r0[net].keys() == expected.keys()
        for k, v in expected.items():
            # Adam's first update is lr * g / (|g| + eps): a gradient within rounding of 0 may
            # flip its sign and move its weight up to 2 lr the other way (a handful of weights)
            diff = (r0[net][k] - v).abs().float()
            assert diff.max() <= 2 * lr + 1e-6, f"{net} {k}"
            assert (diff > 1e-6).float().mean() < 1e-3, f"{net} {k}"
    # per-rank BN would have given other statistics
    assert not torch.allclose(results["per_rank_bn"][0]["D"]["main.3.running_mean"],
                              results["per_rank_bn"][1]["D"]["main.3.running_mean"])


def test_triton_sync_bn_matches_the_reference_on_the_whole_batch(two_ranks):
    results, tmp = two_ranks
    inputs = torch.load(tmp / "triton_inputs.pt", weights_only=True)
    D, layers = _triton_layers("reference")
    D.double()
    (layers(inputs["x"].double()) * inputs["w"].double()).sum().backward()
    # the reference's loss sums the whole batch, each rank's its half, and the ranks average
    expected = {name: p.grad / WORLD for name, p in D.named_parameters() if p.grad is not None}
    assert len(expected) == 7   # three conv weights, two BN (weight, bias) pairs
    for r in results["triton_sync_bn"]:
        assert r["sinks"] == 7   # the second run accumulated every gradient in the kernels
        for grads in (r["grads"], r["grads_fused"]):   # through autograd; into .grad by the kernels
            assert grads.keys() == expected.keys()
            for k, v in expected.items():
                assert rel_err(grads[k], v) < 1e-5, k
        for k, v in D.state_dict().items():   # running stats and step counts
            assert rel_err(r["D"][k], v) < 1e-5 if v.is_floating_point() else torch.equal(r["D"][k], v), k


def test_only_rank_0_writes(two_ranks):
    results, tmp = two_ranks
    assert not (tmp / "per_rank_out1").exists()
    ckpt = checkpoint.load_training(tmp / "per_rank_out0" / "checkpoint.pt")
    assert ckpt["step"] == STEPS and ckpt["batches"]["global_batch"] == BATCH * WORLD
    _assert_same(ckpt["netD"], results["per_rank_bn"][0]["D"], rtol=0, atol=0)
    assert (tmp / "per_rank_out0" / "log.csv").exists()


def test_one_process_checkpoint_resumes_on_two_ranks(two_ranks):
    results, tmp = two_ranks
    one = checkpoint.load_training(tmp / "one_process" / "checkpoint.pt")
    assert (one["batches"]["epoch"], one["batches"]["position"], one["batches"]["global_batch"]) == (0, STEPS, BATCH)
    for r in results["resume_from_one_process"]:
        # STEPS * BATCH = 12 images seen -> the last whole global batch of 8 below that: position 1
        assert r["resumed_at"]["position"] == STEPS * BATCH // (BATCH * WORLD)
        assert r["step"] == STEPS + 2 and r["batches"]["position"] == STEPS * BATCH // (BATCH * WORLD) + 2
    r0, r1 = results["resume_from_one_process"]
    weights = [k for k in r0["G"] if k.endswith("weight")]
    _assert_same({k: r0["G"][k] for k in weights}, {k: r1["G"][k] for k in weights}, rtol=0, atol=0)


def test_two_rank_checkpoint_resumes_in_one_process(two_ranks, capfd):
    results, tmp = two_ranks
    path = tmp / "per_rank_out0" / "checkpoint.pt"
    trainer = Trainer(resume=path, overrides={"steps": STEPS + 2, "out": str(tmp / "resumed_2_to_1")},
                      progress=False)
    assert "global batch was 8, now 4" in capfd.readouterr().err
    # STEPS global batches of 8 = 24 images seen = 6 global batches of 4
    assert trainer.batches.state_dict()["position"] == STEPS * WORLD
    _assert_same(trainer.D.state_dict(), results["per_rank_bn"][0]["D"], rtol=0, atol=0)
    trainer.run()
    assert checkpoint.load_training(tmp / "resumed_2_to_1" / "checkpoint.pt")["step"] == STEPS + 2


def test_ranks_launched_with_different_flags_refuse_to_train(two_ranks):
    results, _ = two_ranks
    for r in results["mismatched_config"]:
        assert "the ranks disagree on the config: rank 1 has" in r["error"]
        assert "launch every rank with the same command" in r["error"]


def test_bad_dist_timeout_is_reported(capsys):
    assert main(["--dist-timeout", "0", "--steps", "1"]) == 1
    assert "--dist-timeout must be positive" in capsys.readouterr().err


def test_a_changed_global_batch_resumes_at_the_last_whole_batch_of_the_images_seen(tmp_path):
    trainer = Trainer(_config(tmp_path, "t", batch_size=20), progress=False)   # 48 images: 2 batches
    saved = {"epoch": 3, "position": 3, "seed": 0, "n": 48, "global_batch": 8}   # 24 images seen
    assert trainer._batch_state(saved) == {**saved, "position": 1, "global_batch": 20}
    saved["position"] = 5   # 40 seen: the epoch's 2 batches of 20 are done
    assert trainer._batch_state(saved) == {**saved, "epoch": 4, "position": 0, "global_batch": 20}


# ---- signals, and a rank that dies or stalls ------------------------------------------------
def _launch_rank(rank, port, out, tmp, *extra):
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               FASTDCGAN_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    args = ["--num-images", "48", "--batch-size", str(BATCH), "--ngf", "8", "--ndf", "8", "--nz", "16",
            "--num-samples", "8", "--log-every", "1", "--device", "cpu", "--backend", "reference",
            "--steps", "100000", "--sample-every", "100000", "--ckpt-every", "2",
            "--dist-timeout", "5", "--no-progress", "--out", str(out), *extra]
    return subprocess.Popen([sys.executable, "-m", "fastdcgan.train", *args], env=env,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path, procs):
    deadline = time.monotonic() + 120
    while not path.exists():
        assert all(p.poll() is None for p in procs), f"a rank exited before {path.name} appeared"
        assert time.monotonic() < deadline, f"no {path.name} within 120 s"
        time.sleep(0.1)


def test_a_signal_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    port = _free_port()
    procs = [_launch_rank(r, port, out, tmp_path, "--ckpt-every", "100000", "--log-every", "3")
             for r in range(WORLD)]
    try:
        _wait_for(out / "real_samples.png", procs)   # rank 0 writes it once both ranks are up
        time.sleep(1.0)                               # some steps into the loop
        procs[1].send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "stopped by a signal to another rank" in errs[0] and "--resume" in errs[0], errs[0]
    assert checkpoint.load_training(out / "checkpoint.pt")["step"] % 3 == 0   # agreed at a log step


def test_a_stalled_rank_times_out_the_other_and_a_dead_one_fails_its_peer(tmp_path):
    """Rank 1 is stopped (SIGSTOP): rank 0 gives up after --dist-timeout. Rank 1, continued,
    finds rank 0 gone. Both exit with the error; the last checkpoint stays readable."""
    out = tmp_path / "run"
    port = _free_port()
    procs = [_launch_rank(r, port, out, tmp_path) for r in range(WORLD)]
    try:
        _wait_for(out / "checkpoint.pt", procs)
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        _, err0 = procs[0].communicate(timeout=60)
        waited = time.monotonic() - t0
        procs[1].send_signal(signal.SIGCONT)
        _, err1 = procs[1].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for rank, (proc, err) in enumerate(zip(procs, (err0, err1))):
        assert proc.returncode == 1, err
        assert f"error: rank {rank} of 2:" in err, err
        assert "another rank died, was stopped or did not answer within 5 s (--dist-timeout)" in err
    assert waited < 5 + 15   # the timeout, plus at most a step and the interpreter's exit
    ckpt = checkpoint.load_training(out / "checkpoint.pt")
    assert ckpt["step"] >= 2 and ckpt["step"] % 2 == 0

