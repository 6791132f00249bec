"""The trainer: a short CLI run writes its outputs; resume is exact; signals and NaNs stop cleanly."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdcgan import checkpoint
from fastdcgan.monitor import NonFiniteError
from fastdcgan.step import EagerStep
from fastdcgan.train import TrainConfig, Trainer, main, train

TINY = dict(num_images=48, batch_size=8, ngf=8, ndf=8, nz=16, num_samples=8, log_every=2,
            device="cpu", backend="reference")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDCGAN_CACHE", str(tmp_path / "cache"))


def _cli(out, *extra):
    return ["--num-images", "48", "--batch-size", "8", "--ngf", "8", "--ndf", "8", "--nz", "16",
            "--num-samples", "8", "--log-every", "2", "--device", "cpu", "--backend", "reference",
            "--out", str(out), "--no-progress", *extra]


def test_cli_run_writes_grids_log_plot_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli(out, "--steps", "6", "--sample-every", "3", "--ckpt-every", "4",
                     "--eval-every", "6", "--eval-images", "16")) == 0
    names = sorted(p.name for p in out.iterdir())
    for name in ("real_samples.png", "fake_samples_step_000003.png", "fake_samples_step_000006.png",
                 "log.csv", "losses.png", "checkpoint.pt"):
        assert name in names
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]
    assert all(0 < float(r["d_x"]) < 1 and float(r["loss_d"]) > 0 for r in rows)
    assert float(rows[-1]["swd"]) > 0
    ckpt = checkpoint.load_training(out / "checkpoint.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["ngf"] == 8
    assert set(ckpt["netG"]) == set(checkpoint.generator_from_state(ckpt["netG"]).state_dict())
    assert "trained 6 steps" in capsys.readouterr().out


def _params(trainer):
    return {**{"G." + k: v for k, v in trainer.G.state_dict().items()},
            **{"D." + k: v for k, v in trainer.D.state_dict().items()}}


def test_resume_is_exact(tmp_path):
    straight = train(TrainConfig(steps=8, out=str(tmp_path / "a"), **TINY), progress=False)
    train(TrainConfig(steps=4, out=str(tmp_path / "b"), **TINY), progress=False)
    resumed = train(resume=tmp_path / "b" / "checkpoint.pt", overrides={"steps": 8}, progress=False)
    assert resumed.step == 8
    a, b = _params(straight), _params(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    for opt in ("optG", "optD"):
        sa, sb = getattr(straight, opt).state_dict(), getattr(resumed, opt).state_dict()
        for i in sa["state"]:
            torch.testing.assert_close(sa["state"][i]["exp_avg_sq"], sb["state"][i]["exp_avg_sq"],
                                       rtol=0, atol=0)


def test_resume_cli_keeps_the_checkpoint_config(tmp_path):
    out = tmp_path / "run"
    assert main(_cli(out, "--steps", "2", "--lr", "1e-4")) == 0
    assert main(["--resume", str(out / "checkpoint.pt"), "--steps", "4", "--no-progress"]) == 0
    ckpt = checkpoint.load_training(out / "checkpoint.pt")
    assert ckpt["step"] == 4 and ckpt["config"]["lr"] == 1e-4 and ckpt["config"]["ngf"] == 8
    with pytest.raises(ValueError, match="keeps the model's shape"):
        Trainer(resume=out / "checkpoint.pt", overrides={"ngf": 16})


def test_lr_defaults_per_device_and_an_explicit_lr_wins(tmp_path):
    """CPU default lr 1e-3 (the CPU run's 1200 steps are too few for the paper's 2e-4), GPU 2e-4."""
    assert TrainConfig(device="cpu").resolve().lr == 1e-3
    assert TrainConfig(device="cpu", lr=3e-4).resolve().lr == 3e-4
    assert TrainConfig.GPU_DEFAULTS["lr"] == 2e-4
    with pytest.raises(ValueError, match="need lr > 0"):
        TrainConfig(device="cpu", lr=0.0).resolve()
    assert main(_cli(tmp_path / "default", "--steps", "1")) == 0
    assert checkpoint.load_training(tmp_path / "default" / "checkpoint.pt")["config"]["lr"] == 1e-3
    assert main(_cli(tmp_path / "explicit", "--steps", "1", "--lr", "5e-4")) == 0
    ckpt = checkpoint.load_training(tmp_path / "explicit" / "checkpoint.pt")
    assert ckpt["config"]["lr"] == 5e-4
    trainer = Trainer(resume=tmp_path / "explicit" / "checkpoint.pt", progress=False)
    assert trainer.config.lr == 5e-4 and trainer.optG.param_groups[0]["lr"] == 5e-4
    # flags given on resume override the checkpoint's, in the optimizers too
    trainer = Trainer(resume=tmp_path / "explicit" / "checkpoint.pt", overrides={"lr": 2e-5, "beta1": 0.3},
                      progress=False)
    for opt in (trainer.optG, trainer.optD):
        assert opt.param_groups[0]["lr"] == 2e-5 and opt.param_groups[0]["betas"] == (0.3, 0.999)


def test_an_epochs_run_resumes_without_flags(tmp_path):
    """The checkpoint of an --epochs run holds the derived step count too; a resume without
    --steps/--epochs derives it again instead of refusing "both"."""
    first = train(TrainConfig(epochs=0.5, out=str(tmp_path), **TINY), progress=False)
    assert first.step == 3   # 48 images / batch 8 = 6 steps per epoch
    again = Trainer(resume=tmp_path / "checkpoint.pt", progress=False)
    assert again.config.steps == 3 and again.config.epochs == 0.5
    longer = train(resume=tmp_path / "checkpoint.pt", overrides={"epochs": 1.0}, progress=False)
    assert longer.step == 6


def test_cuda_graph_flag(tmp_path, capsys):
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        TrainConfig(cuda_graph=True, device="cpu").resolve()
    trainer = Trainer(TrainConfig(steps=1, out=str(tmp_path), **TINY), progress=False)
    assert type(trainer._step) is EagerStep   # CPU: uncaptured by default
    assert main(_cli(tmp_path, "--steps", "1", "--no-cuda-graph")) == 0
    assert main(_cli(tmp_path, "--steps", "1", "--cuda-graph")) == 1
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_bad_config_is_reported(tmp_path, capsys):
    assert main(_cli(tmp_path, "--steps", "2", "--batch-size", "0")) == 1
    assert "--batch-size must be positive" in capsys.readouterr().err
    assert main(_cli(tmp_path, "--data", str(tmp_path / "nowhere"))) == 1
    assert "nowhere" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "missing.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(TrainConfig(steps=8, ckpt_every=2, out=str(tmp_path), **TINY), progress=False)
    real_step = trainer.train_step

    def poisoned_step():
        stats = real_step()
        if trainer.step >= 3:
            with torch.no_grad():
                trainer.G.main[0].weight.fill_(float("nan"))
        return stats

    trainer.train_step = poisoned_step
    with pytest.raises(NonFiniteError, match="non-finite"):
        trainer.run()
    ckpt = checkpoint.load_training(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["netG"].values() if v.is_floating_point())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    out = tmp_path / "run"
    args = _cli(out, "--steps", "100000", "--sample-every", "100000", "--ckpt-every", "100000")
    proc = subprocess.Popen([sys.executable, "-m", "fastdcgan.train", *args],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "real_samples.png").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the trainer never started"
            time.sleep(0.1)
        time.sleep(1.0)  # some steps into the loop
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert f"stopped by {sig.name}" in err and "--resume" in err
    ckpt = checkpoint.load_training(out / "checkpoint.pt")
    assert 0 < ckpt["step"] < 100000
    assert (out / "log.csv").exists()
