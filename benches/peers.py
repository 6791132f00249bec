"""The training steps a user could pick instead of fastdcgan, and fastdcgan's own, each as a
zero-argument callable running one whole step (D on real + D on fake + D update, G update) of
the pytorch/examples DCGAN (nz=100, ngf=ndf=64) on the GPU. Shared by bench_step.py (pytest-
benchmark) and step_table.py (the printed comparison).

Peers (the variants ../shared/design/peers.md measured; the best one is the bf16 graph):
  eager fp32        pytorch/examples as written: NCHW, sigmoid + BCELoss, torch.optim.Adam
  graph fp32        the same step (logits + BCEWithLogitsLoss, Adam(capturable)) in one CUDA graph
  graph bf16 CL     bf16 autocast, channels_last, whole-step CUDA graph
  compile fp32      torch.compile (default mode) of G and D, Adam(fused)
Ours: fastdcgan's trainer step (fused Triton kernels, FusedAdam, fused BCE), captured in one
CUDA graph, data gathered from the GPU-resident uint8 set and z drawn every step.
"""
import torch
from torch import nn

from fastdcgan import Discriminator, Generator

NZ = 100
PEERS = ("eager fp32", "graph fp32", "graph bf16 CL", "compile fp32")


def _models(channels_last=False):
    torch.manual_seed(0)
    g = Generator(backend="reference").cuda()
    d = Discriminator(backend="reference").cuda()
    if channels_last:
        g, d = (m.to(memory_format=torch.channels_last) for m in (g, d))
    return g, d


def _fixed_batch(batch, channels_last=False):
    real = torch.rand(batch, 3, 64, 64, device="cuda") * 2 - 1
    if channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    return real, torch.randn(batch, NZ, 1, 1, device="cuda")


def _examples_step(g, d, opt_g, opt_d, real, z, *, logits, bf16=False, compile_=False):
    """pytorch/examples' loop body; logits=True feeds D's pre-sigmoid scores to BCEWithLogits."""
    crit = nn.BCEWithLogitsLoss() if logits else nn.BCELoss()
    score = d.logits if logits else d
    gen = g
    if compile_:
        gen, score = torch.compile(g), torch.compile(score)
    ones = torch.ones(real.shape[0], device="cuda")
    zeros = torch.zeros(real.shape[0], device="cuda")

    def step():
        d.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            err_real = crit(score(real).float(), ones)
            fake = gen(z)
            err_fake = crit(score(fake.detach()).float(), zeros)
        (err_real + err_fake).backward()
        opt_d.step()
        g.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            err_g = crit(score(fake).float(), ones)
        err_g.backward()
        opt_g.step()
    return step


def _adams(g, d, **kw):
    return (torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999), **kw) for m in (g, d))


def captured(step, warmup=3):
    """step (no host synchronisation inside) recorded once into a CUDA graph: the replay callable.
    Warmed up on a side stream first, as torch.cuda.graph asks (allocations, cuDNN's choices,
    the .grad buffers a captured backward accumulates into)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def peer_step(name, batch):
    if name == "eager fp32":
        g, d = _models()
        return _examples_step(g, d, *_adams(g, d), *_fixed_batch(batch), logits=False)
    if name == "graph fp32":
        g, d = _models()
        return captured(_examples_step(g, d, *_adams(g, d, capturable=True, foreach=True),
                                        *_fixed_batch(batch), logits=True))
    if name == "graph bf16 CL":
        g, d = _models(channels_last=True)
        return captured(_examples_step(g, d, *_adams(g, d, capturable=True, foreach=True),
                                        *_fixed_batch(batch, True), logits=True, bf16=True))
    if name == "compile fp32":
        torch._dynamo.reset()
        g, d = _models()
        return _examples_step(g, d, *_adams(g, d, fused=True), *_fixed_batch(batch), logits=True,
                              compile_=True)
    raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")


def ours_step(batch, precision, *, captured=True):
    """fastdcgan's trainer step on the triton backend, CUDA-graph captured unless captured=False."""
    from fastdcgan.data import EpochBatches, load_dataset
    from fastdcgan.optim import FusedAdam
    from fastdcgan.step import CapturedStep, EagerStep, GanStep

    torch.manual_seed(0)
    g = Generator(backend="triton").cuda()
    d = Discriminator(backend="triton").cuda()
    step = GanStep(g, d, FusedAdam(g.parameters()), FusedAdam(d.parameters()), precision=precision)
    batches = EpochBatches(load_dataset("synthetic", size=64, n=max(1024, 2 * batch)).images, batch,
                           device="cuda")
    noise = torch.Generator(device="cuda").manual_seed(1)
    return (CapturedStep if captured else EagerStep)(step, batches, noise, NZ)
