"""One DCGAN training step as pure device work (GanStep), fed from the trainer's batches and
latents op by op (EagerStep) or captured once in a CUDA graph and replayed (CapturedStep: the
trainer's fast path on a GPU).

The step is the pytorch/examples loop: D on a real batch (label 1) and on G(z).detach() (label 0),
D update; then D on the same fakes with label 1, G update. It returns its statistics as 0-d
device tensors and never reads anything on the host, so the caller decides when to synchronise
(the trainer reads them every --log-every steps).

During the G update D's parameters are frozen: backward then skips D's weight gradients, which
the pytorch/examples loop computes and throws away (optD.zero_grad() clears them before D's next
update), so the updated parameters are the same with five fewer weight-gradient GEMMs per step.

The step runs in fastdcgan.kernels.weights.training_step(): with the triton backend the kernels
accumulate the gradients straight into the optimizers' gradient buffers, and a bf16 step reads
its bf16 weights from the copies FusedAdam writes in its update launch (FusedAdam.bf16_copies):
no cast launch per update (other optimizers: one cast per update, not one per use).

With the triton backend D scores the real and the fake batch in ONE fused pass over
cat(real, fake) with per-batch BatchNorm statistics (Discriminator.logits(x, groups=2): the same
result as two calls, running statistics updated real first): half of D's launches in the D
update, twice the rows per GEMM. FASTDCGAN_JOINT_D=0 turns it off (for measuring it).

Otherwise, on one CUDA device (no process group), G(z) runs on a side stream while D(real) runs
on the current one: the two are independent and at batch 128 neither fills the GPU. The streams
fork and join inside the step, so a captured graph holds both branches; G's backward then runs on
the side stream too (autograd's stream semantics), and the G update waits for it. D's two passes
stay on one stream: they update the same running statistics, in order. FASTDCGAN_OVERLAP_G=0
turns the side stream off.
"""
import os
import contextlib
import warnings

import torch

from fastdcgan.kernels.weights import provide_copy, training_step, weights_updated
from fastdcgan.loss import bce_with_logits_of_parts
from fastdcgan.optim import FusedAdam


@contextlib.contextmanager
def _frozen(module):
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class GanStep:
    """`step(real, z)`: one D and one G update of (G, D) with their optimizers (FusedAdam, whose
    zero_grad keeps gradients in place). precision "bf16" runs both networks under bf16 autocast
    (fp32 weights, statistics and optimizer). grad_sync(optimizer), when given, runs between each
    backward and its optimizer step (data-parallel gradient averaging)."""

    def __init__(self, G, D, optG, optD, *, precision="fp32", grad_sync=None):
        self.G, self.D, self.optG, self.optD = G, D, optG, optD
        self.precision = precision
        self.grad_sync = grad_sync
        # autocast's weight-cast cache would hand tensors of one capture to the next replay's
        # code path; without it each cast is part of the step (what a captured step needs)
        self.autocast_cache = True
        self._side = None   # G's stream (see the module docstring), made on the first CUDA step

    def batch_dtype(self, device):
        """The dtype to gather the real batch in: bf16 where the networks run in bf16 (a bf16
        step on CUDA), so the gather writes what the first layer reads; else fp32."""
        bf16 = self.precision == "bf16" and torch.device(device).type == "cuda"
        return torch.bfloat16 if bf16 else torch.float32

    def _autocast(self, device_type):
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16",
                              cache_enabled=self.autocast_cache)

    def _side_stream(self, device):
        if device.type != "cuda" or os.environ.get("FASTDCGAN_OVERLAP_G", "1") == "0" or (
                torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(device=device)
        return self._side

    def _g_and_d_real(self, real, z):
        """G(z) and D.logits(real), on two streams where _side_stream allows."""
        side = self._side_stream(real.device)
        if side is None:
            return self.G(z), self.D.logits(real)
        current = torch.cuda.current_stream(real.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fake = self.G(z)
        logits_real = self.D.logits(real)
        current.wait_stream(side)
        return fake, logits_real

    def _d_real_and_fake(self, real, z):
        """(G(z), D's logits of [real; G(z).detach()]): one grouped D pass with the triton
        backend (see the module docstring), else two."""
        if self.D.uses_triton(real) and os.environ.get("FASTDCGAN_JOINT_D", "1") != "0":
            fake = self.G(z)
            return fake, self.D.logits(torch.cat([real.to(fake.dtype), fake.detach()]), groups=2)
        fake, logits_real = self._g_and_d_real(real, z)
        return fake, torch.cat([logits_real, self.D.logits(fake.detach())])

    def _copying(self, real):
        """The FusedAdams whose bf16 parameter copies the step's kernels read (a bf16 step of
        triton networks on CUDA)."""
        if self.batch_dtype(real.device) != torch.bfloat16:
            return []
        return [opt for net, opt in ((self.G, self.optG), (self.D, self.optD))
                if isinstance(opt, FusedAdam) and net.uses_triton(real)]

    @staticmethod
    def _provide_copies(copying):
        for opt in copying:
            for source, copy, versions in opt.bf16_copies():
                provide_copy(source, copy, versions)

    def _update(self, opt, logits, grad, copying):
        """The update of `opt` from the loss gradient `grad` at `logits`."""
        opt.zero_grad()
        torch.autograd.backward(logits, grad)
        if self._side is not None:
            # kernels of a backward on the side stream may have written straight into .grad
            torch.cuda.current_stream(self._side.device).wait_stream(self._side)
        if self.grad_sync is not None:
            self.grad_sync(opt)
        opt.step()
        weights_updated()
        self._provide_copies(copying)

    def __call__(self, real, z):
        with training_step():
            return self._step(real, z)

    def _step(self, real, z):
        copying = self._copying(real)
        self._provide_copies(copying)
        # each loss, its gradient and the mean D outputs in one fused kernel (fastdcgan.loss)
        with self._autocast(real.device.type):
            fake, logits = self._d_real_and_fake(real, z)
        loss_d, grad, d_out = bce_with_logits_of_parts(logits, (1.0, 0.0))
        self._update(self.optD, logits, grad, copying)

        with _frozen(self.D), self._autocast(real.device.type):
            logits_gen = self.D.logits(fake)
        loss_g, grad, d_out_gen = bce_with_logits_of_parts(logits_gen, (1.0,))
        self._update(self.optG, logits_gen, grad, copying)
        return {"loss_d": loss_d, "loss_g": loss_g, "d_x": d_out[0], "d_g_z": d_out[1],
                "d_g_z_after": d_out_gen[0]}


class _Latents:
    """This rank's latents: every rank draws the global batch's z from `noise` (the same stream on
    every rank) and uses its slice, so a run's latents do not depend on the world size. Drawn
    into one buffer (normal_ on it gives the numbers randn would)."""

    def __init__(self, noise, n, nz, rank, world_size, device):
        self.noise = noise
        self.all = torch.zeros(n * world_size, nz, 1, 1, device=device)
        self.mine = self.all[rank * n:(rank + 1) * n]

    def draw(self):
        self.all.normal_(generator=self.noise)
        return self.mine


class EagerStep:
    """GanStep fed from `batches` (this rank's next batch, gathered on the data's device) and
    `noise`, op by op: the trainer's step without a CUDA graph."""

    def __init__(self, step: GanStep, batches, noise, nz, *, rank=0, world_size=1):
        self.step, self.batches = step, batches
        self.latents = _Latents(noise, batches.batch_size, nz, rank, world_size, batches.data.device)

    def _next_indices(self):
        idx = self.batches.next_indices()
        if idx.numel() != self.batches.batch_size:
            raise ValueError(f"the training step needs a constant batch size ({self.batches.batch_size}), "
                             f"got a batch of {idx.numel()}")
        return idx

    def __call__(self):
        return self.step(self._gather(self._next_indices()), self.latents.draw())

    def _gather(self, idx):
        return self.batches.gather(idx, self.step.batch_dtype(self.batches.data.device))


class CapturedStep(EagerStep):
    """GanStep on CUDA, captured in one CUDA graph after `warmup` eager steps and replayed.

    Per step the host only copies the batch's dataset indices (a slice of the device-resident
    permutation) into a static buffer and draws z into another from `noise` (the same numbers the
    uncaptured step draws); the graph gathers and normalises the uint8 batch, runs both updates
    and writes the statistics. The returned dict holds the graph's static output tensors: read
    them before the next call.

    The graph keeps what it was captured with: parameters, optimizer buffers and BN statistics
    must be updated in place (load_state_dict does; the bf16 weight copies of a bf16 step follow
    such changes before the next replay), and optimizer hyperparameters are frozen (FusedAdam
    reads lr and betas on the host at capture).
    """

    def __init__(self, step: GanStep, batches, noise, nz, *, rank=0, world_size=1, warmup=3):
        if batches.data.device.type != "cuda":
            raise ValueError(f"a captured step needs the data on a CUDA device, not {batches.data.device}")
        super().__init__(step, batches, noise, nz, rank=rank, world_size=world_size)
        self.warmup = max(1, warmup)
        self.idx = torch.zeros(batches.batch_size, dtype=torch.long, device=batches.data.device)
        self.graph = None
        self.outputs = None
        self.eager_steps = 0
        step.autocast_cache = False

    def _body(self):
        return self.step(self._gather(self.idx), self.latents.mine)

    def __call__(self):
        self.idx.copy_(self._next_indices())
        self.latents.draw()
        if self.eager_steps < self.warmup:
            # warm-up on a side stream, as CUDA-graph capture wants: compiles the kernels and
            # creates every lazily built buffer before capture
            side = torch.cuda.Stream(device=self.idx.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.outputs = self._body()
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
            return self.outputs
        if self.graph is None:
            self.graph = self._capture()
        for opt in (self.step.optG, self.step.optD):   # parameters changed since the last step
            if isinstance(opt, FusedAdam):
                opt.refresh_bf16_copies()
        self.graph.replay()
        return self.outputs

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        try:
            with warnings.catch_warnings():
                # the parameters were made on the default stream, capture runs on its own: the
                # gradients still accumulate in place, in stream order
                warnings.filterwarnings("ignore", message=".*AccumulateGrad node's stream")
                with torch.cuda.graph(graph):
                    self.outputs = self._body()
        except RuntimeError as e:
            raise RuntimeError(
                f"capturing the training step in a CUDA graph failed ({e}); train without capture "
                "with --no-cuda-graph and please report this") from e
        return graph
