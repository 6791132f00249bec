"""One optimizer step of DCGAN's G (3,576,704 params) and D (2,765,568 params):
fastdcgan.optim.FusedAdam vs torch.optim.Adam (default, foreach=True, fused=True).

    bash dev.sh bench benches/bench_optim.py            (GPU cases skip without CUDA)
    bash dev.sh bench benches/bench_optim.py -k cuda    (on the GPU machine)

Each timed call is one `step()` (gradients fixed, so nothing else runs); on CUDA the call ends
with torch.cuda.synchronize(), so it is the latency a training loop sees for the step. On CUDA
extra_info["kernels_per_step"] counts the kernels one step launches (target for FusedAdam: 1).
"""
import pytest
import torch

from fastdcgan import Discriminator, Generator
from fastdcgan.optim import FusedAdam

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]
NETS = {"G": Generator, "D": Discriminator}
HP = dict(lr=2e-4, betas=(0.5, 0.999))
IMPLS = {
    "fastdcgan_fused": lambda ps: FusedAdam(ps, **HP),
    "torch_default": lambda ps: torch.optim.Adam(ps, **HP),
    "torch_foreach": lambda ps: torch.optim.Adam(ps, foreach=True, **HP),
    "torch_fused": lambda ps: torch.optim.Adam(ps, fused=True, **HP),
}


def _count_kernels(step):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("device", DEVICES)
def test_adam_step(benchmark, device, net, impl):
    torch.manual_seed(0)
    model = NETS[net]().to(device)
    params = list(model.parameters())
    opt = IMPLS[impl](params)
    for p in params:  # FusedAdam's p.grad is a view of its flat buffer: write into it
        g = torch.randn_like(p) * 1e-2
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)

    if device == "cuda":
        def step():
            opt.step()
            torch.cuda.synchronize()
    else:
        step = opt.step

    for _ in range(3):
        step()
    benchmark.group = f"adam-step-{net}-{device}"
    benchmark.extra_info["params"] = sum(p.numel() for p in params)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if device == "cuda":
        benchmark.extra_info["kernels_per_step"] = _count_kernels(opt.step)
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    benchmark(step)
