"""Train the DCGAN: `python -m fastdcgan.train` (built-in faces) or `fastdcgan.train.train(config)`.

One step is the pytorch/examples loop: D on a real batch (label 1) and on G(z).detach() (label 0),
D update; then D on the same fakes with label 1, G update. Outputs under --out: real_samples.png,
fake_samples_step_NNNNNN.png (fixed noise), log.csv, losses.png and checkpoint.pt.

Under torchrun every rank runs the same command on its shard of each global batch (see
fastdcgan.distributed); rank 0 alone writes the outputs.
"""
import argparse
import csv
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastdcgan import checkpoint, distributed
from fastdcgan.images import plot_losses, save_grid
from fastdcgan.models import BACKENDS, Discriminator, Generator, resolve_device
from fastdcgan.monitor import NonFiniteError, StabilityMonitor
from fastdcgan.optim import FusedAdam
from fastdcgan.step import CapturedStep, EagerStep, GanStep

LOG_FIELDS = ("step", "epoch", "loss_d", "loss_g", "d_x", "d_g_z", "d_g_z_after", "seconds", "swd")


@dataclass
class TrainConfig:
    """Every knob of a run. None means "pick the default for the device" (see resolve())."""
    data: str = "synthetic"
    num_images: int = 20000          # size of the built-in synthetic set
    crop: int | None = None          # center crop before resizing (108 for CelebA's common crop)
    steps: int | None = None         # total steps of the run (a resumed run counts from 0 too)
    epochs: float | None = None      # alternative to steps
    batch_size: int | None = None
    lr: float | None = None          # Adam's learning rate (None: CPU 1e-3, GPU 2e-4)
    beta1: float = 0.5
    beta2: float = 0.999
    nz: int = 100
    ngf: int | None = None
    ndf: int | None = None
    seed: int = 0
    out: str = "runs/dcgan"
    backend: str = "auto"
    precision: str = "fp32"
    device: str = "auto"
    sample_every: int | None = None
    ckpt_every: int | None = None
    log_every: int = 10
    eval_every: int = 0              # steps between SWD evaluations (0: only at the end)
    eval_images: int = 1000          # real and generated images per SWD evaluation
    num_samples: int = 64            # images in the fixed-noise grid
    sync_bn: bool = False            # BN statistics of the global batch (all ranks), not per rank
    cuda_graph: bool | None = None   # capture the step in a CUDA graph (None: on CUDA devices)

    # Paper setup on a GPU; on a CPU a narrower net and smaller batch so that the default run
    # finishes in minutes and still ends with recognisable faces. The CPU run's 1200 steps are too
    # few for the paper's lr 2e-4 (D wins for hundreds of steps, then the samples mode-collapse:
    # SWD ~111); at 1e-3 D and G stay balanced and the faces vary (SWD ~70-90).
    GPU_DEFAULTS = dict(batch_size=128, ngf=64, ndf=64, epochs=5, lr=2e-4, sample_every=500,
                        ckpt_every=1000)
    CPU_DEFAULTS = dict(batch_size=32, ngf=32, ndf=32, steps=1200, lr=1e-3, sample_every=200,
                        ckpt_every=200)

    def resolve(self):
        """Fills device-dependent defaults and validates; returns a new config."""
        device = resolve_device(self.device)
        cfg = dataclasses.replace(self, device=device)
        defaults = self.GPU_DEFAULTS if device.startswith("cuda") else self.CPU_DEFAULTS
        for k, v in defaults.items():
            if k in ("steps", "epochs"):
                continue
            if getattr(cfg, k) is None:
                setattr(cfg, k, v)
        if cfg.steps is None and cfg.epochs is None:
            cfg.steps, cfg.epochs = defaults.get("steps"), defaults.get("epochs")
        cfg.validate()
        return cfg

    def validate(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.cuda_graph and not str(self.device).startswith("cuda"):
            raise ValueError(f"--cuda-graph needs a CUDA device, got --device {self.device}")
        for name in ("batch_size", "nz", "ngf", "ndf", "sample_every", "ckpt_every", "log_every",
                     "num_samples", "num_images", "eval_images"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        if not (self.lr is not None and self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"need lr > 0 and betas in [0, 1): lr={self.lr} beta1={self.beta1} "
                             f"beta2={self.beta2}")

    def to_dict(self):
        return dataclasses.asdict(self)


MODEL_FIELDS = ("nz", "ngf", "ndf")


class Trainer:
    """Holds the models, optimizers, data and run state; `run()` trains to config.steps.

    In a torch.distributed process group (torchrun) each rank holds one Trainer: config.batch_size
    is the per-rank batch, gradients are averaged over the ranks every step, rank 0 writes."""

    def __init__(self, config: TrainConfig | None = None, resume=None, overrides=None, progress=True):
        """A new run from `config`, or with `resume` the checkpoint's run, with `overrides`
        (a dict of TrainConfig fields: run length, outputs, intervals) applied on top."""
        from fastdcgan.data import EpochBatches, load_dataset

        self.progress = progress
        ckpt = checkpoint.load_training(resume) if resume else None
        if ckpt is not None:
            config = self._resumed_config(ckpt["config"], overrides or {}, resume)
        elif overrides:
            config = dataclasses.replace(config or TrainConfig(), **overrides)
        self.config = cfg = (config or TrainConfig()).resolve()
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.device = torch.device(distributed.rank_device(cfg.device))
        # Only rank 0's --out is written, so the ranks may differ there and nowhere else.
        distributed.check_same({k: v for k, v in cfg.to_dict().items() if k != "out"}, "config")
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)

        self.dataset = load_dataset(cfg.data, size=64, crop=cfg.crop, n=cfg.num_images)
        self.batches = EpochBatches(self.dataset.images, cfg.batch_size, seed=cfg.seed, device=self.device,
                                    rank=self.rank, world_size=self.world_size)
        if cfg.steps is None:
            cfg.steps = max(1, math.ceil(cfg.epochs * self.batches.steps_per_epoch))

        self.G = Generator(nz=cfg.nz, ngf=cfg.ngf, backend=cfg.backend).to(self.device)
        self.D = Discriminator(ndf=cfg.ndf, backend=cfg.backend).to(self.device)
        if self.device.type == "cuda" and cfg.backend != "reference":
            for m in (self.G, self.D):   # before the optimizers, which keep the layout
                m.use_kernel_layout()
        distributed.use_sync_batchnorm((self.G, self.D), cfg.sync_bn)
        betas = (cfg.beta1, cfg.beta2)
        self.optG = FusedAdam(self.G.parameters(), lr=cfg.lr, betas=betas)
        self.optD = FusedAdam(self.D.parameters(), lr=cfg.lr, betas=betas)
        # The monitor sees one reading per log interval: its window is counted in readings, its
        # cooldown (one warning of a kind per 200 steps) and warmup (no diversity check before
        # step 500: an untrained generator is not diverse yet) in steps.
        self.monitor = StabilityMonitor(window=max(2, 200 // cfg.log_every), cooldown=200)
        # Latents come from their own generator so that a resumed run draws the same noise; every
        # rank draws the global batch's latents and keeps its slice (see fastdcgan.step).
        self.noise = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.fixed_noise = torch.randn(cfg.num_samples, cfg.nz, 1, 1, device=self.device,
                                       generator=torch.Generator(device=self.device).manual_seed(cfg.seed + 2))
        self.step = 0
        self.log_rows = []
        if ckpt is not None:
            self._restore(ckpt, resume)
        self.gan_step = GanStep(self.G, self.D, self.optG, self.optD, precision=cfg.precision,
                                grad_sync=distributed.average_gradients)
        captured = cfg.cuda_graph if cfg.cuda_graph is not None else self.device.type == "cuda"
        self._step = (CapturedStep if captured else EagerStep)(
            self.gan_step, self.batches, self.noise, cfg.nz, rank=self.rank, world_size=self.world_size)

    # ---- state -------------------------------------------------------------------------------
    @staticmethod
    def _resumed_config(saved, overrides, path):
        """The checkpoint's config with `overrides` applied; the model's shape cannot change."""
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        for name in MODEL_FIELDS:
            if name in overrides and overrides[name] != saved.get(name):
                raise ValueError(f"--{name} {overrides[name]} differs from the checkpoint's "
                                 f"{saved.get(name)} ({path}); a resumed run keeps the model's shape")
        merged = {k: v for k, v in saved.items() if k in fields}
        merged.update(overrides)
        if "steps" in overrides:
            merged["epochs"] = None
        elif "epochs" in overrides or merged.get("epochs") is not None:
            # an --epochs run also saved the step count derived from it: derive it again (the
            # data or the world size may have changed)
            merged["steps"] = None
        return TrainConfig(**merged)

    def state_dict(self):
        return {
            "netG": self.G.state_dict(),
            "netD": self.D.state_dict(),
            "optG": self.optG.state_dict(),
            "optD": self.optD.state_dict(),
            "step": self.step,
            "epoch": self.batches.epoch,
            "batches": self.batches.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "noise": self.noise.get_state().cpu()},
            "fixed_noise": self.fixed_noise.cpu(),
            "config": self.config.to_dict(),
            "log": self.log_rows,
        }

    def _restore(self, ckpt, path):
        checkpoint.load_module_state(self.G, ckpt["netG"], "generator", path)
        checkpoint.load_module_state(self.D, ckpt["netD"], "discriminator", path)
        for opt, key in ((self.optG, "optG"), (self.optD, "optD")):
            opt.load_state_dict(ckpt[key])
            # the optimizer's state_dict carries the lr and betas it was saved with; the run's
            # config (the checkpoint's, with --lr/--beta1/--beta2 given now) is what trains on
            for group in opt.param_groups:
                group["lr"], group["betas"] = self.config.lr, (self.config.beta1, self.config.beta2)
        self.step = int(ckpt["step"])
        self.batches.load_state_dict(self._batch_state(ckpt["batches"]))
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.noise.set_state(ckpt["rng"]["noise"])
        self.fixed_noise = ckpt["fixed_noise"].to(self.device)
        self.log_rows = list(ckpt.get("log", []))

    def _batch_state(self, saved):
        """The checkpoint's data position for this run's global batch (batch_size x world size).
        When that changed (another world size or batch size), the run resumes in the same epoch
        at the last whole new global batch within the images already seen: none is skipped."""
        if saved["global_batch"] == self.batches.global_batch:
            return saved
        seen = saved["position"] * saved["global_batch"]
        epoch, position = saved["epoch"], seen // self.batches.global_batch
        if position >= self.batches.steps_per_epoch:
            epoch, position = epoch + 1, 0
        if self.is_main:
            print(f"note: the checkpoint's global batch was {saved['global_batch']}, now "
                  f"{self.batches.global_batch}: resuming at epoch {epoch}, image "
                  f"{position * self.batches.global_batch} (the checkpoint was at epoch "
                  f"{saved['epoch']}, image {seen})", file=sys.stderr)
        return {**saved, "epoch": epoch, "position": position, "global_batch": self.batches.global_batch}

    def save_checkpoint(self):
        path = self.out / "checkpoint.pt"
        checkpoint.save(path, self.state_dict())
        return path

    # ---- one step ----------------------------------------------------------------------------
    def train_step(self):
        """One D update and one G update; returns the step's statistics as 0-d device tensors
        (with a captured step: the graph's output buffers, valid until the next step)."""
        stats = self._step()
        self.step += 1
        return stats

    # ---- outputs -----------------------------------------------------------------------------
    def _real_images(self, num, seed_offset):
        """A fixed random subset of the training set as floats on the device."""
        from fastdcgan.data import to_float

        n = len(self.dataset.images)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + seed_offset))
        return to_float(self.dataset.images[pick[:num].sort().values]).to(self.device)

    def write_samples(self):
        """The fixed-noise grid from G.eval(); its diversity is checked against real images."""
        was_training = self.G.training
        self.G.eval()
        with torch.no_grad():
            fake = self.G(self.fixed_noise)
        self.G.train(was_training)
        save_grid(fake, self.out / f"fake_samples_step_{self.step:06d}.png")
        self._warn(self.monitor.check_samples(self.step, fake, self.real_grid))

    def evaluate(self):
        """SWD between eval_images generated and real images, into the last log row."""
        from fastdcgan.evaluate import evaluate_generator

        if self.real_eval is None:
            self.real_eval = self._real_images(self.config.eval_images, 4)
        result = evaluate_generator(self.G, self.real_eval, seed=self.config.seed)
        self.log_rows[-1]["swd"] = round(result["swd_avg"], 3)
        return result

    def _warn(self, messages):
        if not self.is_main:  # every rank sees the same (rank-averaged) numbers
            return
        for msg in messages:
            tqdm.write(f"warning: {msg}", file=sys.stderr)
            with open(self.out / "warnings.log", "a") as f:
                f.write(msg + "\n")

    def _write_log(self):
        path = self.out / "log.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(self.log_rows)
        if len(self.log_rows) > 1:
            plot_losses(self.log_rows, self.out / "losses.png")

    # ---- the loop ----------------------------------------------------------------------------
    def run(self):
        cfg = self.config
        if self.is_main:  # only rank 0 writes files
            self.out.mkdir(parents=True, exist_ok=True)
            self.real_grid = self._real_images(cfg.num_samples, 3)
            self.real_eval = None
            real_path = self.out / "real_samples.png"
            if not real_path.exists():
                save_grid(self.real_grid, real_path)
        if self.world_size > 1 and self.is_main:
            print(f"{self.world_size} ranks x batch {cfg.batch_size} = global batch "
                  f"{self.batches.global_batch}", file=sys.stderr)
        stop = _StopRequest()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.progress and self.is_main),
                   dynamic_ncols=True, desc=f"{cfg.device} {cfg.backend} {cfg.precision}")
        t0, stats, stopping = time.perf_counter(), None, False
        try:
            with stop:
                while self.step < cfg.steps and not stopping:
                    stats = self.train_step()
                    sample = self.step % cfg.sample_every == 0
                    save = self.step % cfg.ckpt_every == 0
                    evaluate = cfg.eval_every and self.step % cfg.eval_every == 0
                    # Reading the losses checks them: never sample or save a non-finite state.
                    logged = sample or save or evaluate or self.step % cfg.log_every == 0
                    if logged:
                        self._log(stats, time.perf_counter() - t0, bar)
                    # A signal may reach the ranks a step apart: they agree on stopping where
                    # they sync anyway (at log steps).
                    if logged or self.world_size == 1:
                        stopping = distributed.any_rank(stop.requested is not None)
                    if self.is_main:
                        if evaluate:
                            self.evaluate()
                        if sample:
                            self.write_samples()
                            self._write_log()
                        if save:
                            self.save_checkpoint()
                    bar.update(1)
        finally:
            bar.close()
        if stats is not None and self.log_rows[-1:] and self.log_rows[-1]["step"] != self.step:
            self._log(stats, time.perf_counter() - t0, None)
        path = self.out / "checkpoint.pt"
        if self.is_main:
            if stats is not None and cfg.eval_every and self.log_rows[-1]["swd"] == "":
                self.evaluate()
            # The last step may have written its grid and checkpoint already; a run that took no
            # step (resumed at its end) still leaves both in --out.
            if stats is None or self.step % cfg.sample_every:
                self.write_samples()
            self._write_log()
            if stats is None or self.step % cfg.ckpt_every:
                path = self.save_checkpoint()
        distributed.barrier()  # every rank returns once the final checkpoint is on disk
        if stopping and self.is_main:
            print(f"stopped by {stop.requested or 'a signal to another rank'} at step {self.step}; "
                  f"checkpoint saved to {path}; continue with --resume {path}", file=sys.stderr)
        return path

    def _log(self, stats, seconds, bar):
        values = distributed.mean_over_ranks(stats)  # one host sync per log interval
        self._warn(self.monitor.update(self.step, values["loss_d"], values["loss_g"], values["d_x"],
                                       values["d_g_z"]))
        row = {"step": self.step, "epoch": self.batches.epoch, **values, "seconds": round(seconds, 3),
               "swd": ""}
        self.log_rows.append(row)
        if bar is not None:
            bar.set_postfix(loss_D=f"{values['loss_d']:.3f}", loss_G=f"{values['loss_g']:.3f}",
                            D_x=f"{values['d_x']:.2f}", D_G_z=f"{values['d_g_z']:.2f}")


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint gets written."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def train(config: TrainConfig | dict | None = None, resume=None, overrides=None, progress=True):
    """Trains with `config` (TrainConfig or dict) or resumes from `resume`; returns the Trainer."""
    if isinstance(config, dict):
        config = TrainConfig(**config)
    trainer = Trainer(config, resume=resume, overrides=overrides, progress=progress)
    trainer.run()
    return trainer


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m fastdcgan.train",
        description="Train a DCGAN (pytorch/examples architecture) on the built-in synthetic faces, "
                    "CelebA or any image folder. Defaults: the paper's setup on a GPU; on a CPU a "
                    "narrower net (ngf=ndf=32, batch 32, 1200 steps, lr 1e-3) that finishes in "
                    "minutes.")
    a = p.add_argument
    a("--data", "--dataroot", dest="data", default="synthetic",
      help="'synthetic' (built-in faces, no download) or a folder of images, e.g. CelebA's img_align_celeba")
    a("--num-images", type=int, default=20000, help="size of the synthetic set")
    a("--crop", type=int, default=None, help="center-crop this many pixels before resizing (108 for CelebA)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="total training steps")
    g.add_argument("--epochs", "--niter", dest="epochs", type=float, default=None, help="epochs over the data")
    a("--batch-size", "--batchSize", dest="batch_size", type=int, default=None,
      help="per rank: under torchrun the global batch is this x the number of ranks")
    a("--lr", type=float, default=None,
      help="Adam's learning rate (default: CPU 1e-3, GPU 2e-4 (the paper's))")
    a("--beta1", type=float, default=0.5)
    a("--beta2", type=float, default=0.999)
    a("--nz", type=int, default=100, help="latent size")
    a("--ngf", type=int, default=None, help="generator width")
    a("--ndf", type=int, default=None, help="discriminator width")
    a("--seed", "--manualSeed", dest="seed", type=int, default=0)
    a("--out", "--outf", dest="out", default="runs/dcgan", help="output folder")
    a("--backend", default="auto", choices=BACKENDS,
      help="auto: fused Triton kernels on CUDA, eager PyTorch on CPU")
    a("--precision", default="fp32", choices=("fp32", "bf16"))
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    a("--resume", default=None, metavar="CKPT", help="continue a run from its checkpoint.pt")
    a("--sample-every", type=int, default=None, help="steps between sample grids")
    a("--ckpt-every", type=int, default=None, help="steps between checkpoints")
    a("--log-every", type=int, default=10, help="steps between loss reads (host syncs)")
    a("--num-samples", type=int, default=64, help="images in the fixed-noise sample grid")
    a("--eval-every", type=int, default=0,
      help="steps between SWD evaluations against real images (logged, plotted); 0: never")
    a("--eval-images", type=int, default=1000, help="images per SWD evaluation")
    a("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
      help="under torchrun, BatchNorm statistics of the global batch (all-reduced every layer) "
           "instead of each rank's own; a single process has nothing to sync (no effect)")
    a("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="SECONDS",
      help="under torchrun, the longest any rank waits for the others (rendezvous, each "
           "all-reduce, rank 0's sample/checkpoint writes) before it exits with an error")
    a("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
      help="capture the whole training step in one CUDA graph and replay it (default: on CUDA); "
           "--no-cuda-graph runs it op by op")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    resume, progress = args.pop("resume"), not args.pop("no_progress")
    dist_timeout = args.pop("dist_timeout")
    # What the user typed (not argparse defaults) is what overrides a resumed run's config.
    overrides = {k: v for k, v in _typed_args(argv).items() if k in args}
    try:
        distributed.init_from_env(dist_timeout)
        if resume:
            trainer = train(resume=resume, overrides=overrides, progress=progress)
        else:
            trainer = train(TrainConfig(**args), progress=progress)
    except distributed.PeerFailure as e:  # the group is broken: leave without tearing it down
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.shutdown()
        return 1
    distributed.shutdown()
    if trainer.is_main:
        print(f"trained {trainer.step} steps; samples, log.csv, losses.png and checkpoint.pt in "
              f"{trainer.config.out}")
    return 0


def _typed_args(argv):
    """Only the options present on the command line (argparse defaults suppressed)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
