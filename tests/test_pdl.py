"""Programmatic dependent launch (kernels/pdl.py, FASTDCGAN_PDL=1): when it is on, and that every
kernel launched with it waits for its predecessor before touching memory. The GPU run of a
captured step with PDL is tests/test_step.py's; its kernels' sm_90 compile, test_compile_sm90."""
import ast
import inspect
import textwrap

import pytest
import torch

from fastdcgan import Discriminator, Generator
from fastdcgan.kernels import bn, gather, implicit_gemm, pdl
from precision import interpreter_only

KERNEL_MODULES = (implicit_gemm, bn, gather)


def _kernels():
    found = {}
    for module in KERNEL_MODULES:
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                found[name] = obj
    return found


def test_every_kernel_waits_for_its_predecessor_first():
    """The PDL contract: a kernel launched with launch_pdl runs grid_dependency_wait(PDL) before
    anything else (a kernel reading its inputs first could read them before they are written)."""
    kernels = _kernels()
    assert len(kernels) == 12, sorted(kernels)
    for name, kernel in kernels.items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn)))
        fn = tree.body[0]
        assert "PDL" in [a.arg for a in fn.args.args], name
        first = fn.body[0]
        assert ast.unparse(first) == "grid_dependency_wait(PDL)", (name, ast.unparse(first))


def test_enabled_on_sm90_gpus_with_the_switch(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl, "_capability", lambda index: 9)
    monkeypatch.delenv("FASTDCGAN_PDL", raising=False)
    assert not pdl.enabled(cuda)                      # off by default
    monkeypatch.setenv("FASTDCGAN_PDL", "1")
    assert pdl.enabled(cuda)
    assert pdl.launch_options(cuda) == {"PDL": True, "launch_pdl": True}
    assert not pdl.enabled(torch.device("cpu"))
    monkeypatch.setattr(pdl, "_capability", lambda index: 8)   # an A100: no griddepcontrol
    assert not pdl.enabled(cuda)
    assert pdl.launch_options(cuda) == {"PDL": False}
    monkeypatch.setattr(pdl, "_capability", lambda index: 9)
    monkeypatch.setenv("TRITON_INTERPRET", "1")       # the interpreter runs no inline PTX
    assert not pdl.enabled(cuda)


@interpreter_only
@pytest.mark.parametrize("on", [True, False])
def test_every_launch_of_a_training_pass_passes_both_halves(on, monkeypatch):
    """Each launch of a training pass (G forward and backward, D's grouped pass, eval G) carries
    the kernel's PDL constexpr and Triton's launch_pdl together, on or off (launches recorded,
    not run)."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(pdl, "enabled", lambda device: on)
    launches = []

    def record(self, *args, grid, **kwargs):
        launches.append((self.fn.__name__, kwargs["PDL"], kwargs.get("launch_pdl", False)))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    G, D = Generator(nz=8, ngf=4, backend="triton"), Discriminator(ndf=4, backend="triton")
    fake = G(torch.randn(4, 8, 1, 1))
    D.logits(torch.cat([torch.randn(4, 3, 64, 64), fake.detach()]), groups=2).sum().backward()
    D.logits(fake).sum().backward()
    G.eval()
    with torch.no_grad():
        G(torch.randn(4, 8, 1, 1))
    names = {name for name, _, _ in launches}
    assert {"conv_gemm_kernel", "conv_wgrad_kernel", "bn_finalize_kernel", "gemv_kernel",
            "tap_gemm_kernel", "tap_sum_kernel"} <= names, names
    assert all(p is on and l is on for _, p, l in launches), launches
