"""Programmatic dependent launch (PDL, sm_90+), opt-in with FASTDCGAN_PDL=1.

A training step is ~110 kernels in a row, many of them short (BN finalizes, elementwise passes,
the small layers' GEMMs), and each waits for its predecessor to finish and drain before its own
programs are launched: a gap of about a microsecond per boundary in a CUDA graph (session 2's
profile: 4.78 ms of kernels in a 5.00 ms step). With PDL a kernel is launched while its
predecessor's last programs still run; its programs wait (griddepcontrol.wait) for the
predecessor to complete and its writes to become visible before touching memory, so only the
launch latency overlaps, never the data.

The contract that keeps this safe: every kernel launched with launch_pdl=True calls
`grid_dependency_wait(PDL)` as its first statement, so none reads or writes memory before the
previous kernel in the stream has completed, and since that one waited for its own predecessor,
all earlier work is complete too. Each program first signals that the next kernel may launch
(griddepcontrol.launch_dependents), which only lets the next kernel's programs occupy SMs as this
kernel's programs leave them. Kernels of torch and of the C++ extension are launched without the
attribute and wait for completion as usual. `launch_options` gives both halves together.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def grid_dependency_wait(PDL: tl.constexpr):
    # The first statement of every kernel: under PDL, let the next kernel launch and wait for the
    # previous one to complete (its writes visible). Without PDL, nothing.
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@functools.lru_cache(maxsize=None)
def _capability(device_index):
    return torch.cuda.get_device_capability(device_index)[0]


def major_capability(device):
    """The compute capability's major number of the CUDA device `device` (cached)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def enabled(device):
    """FASTDCGAN_PDL=1 (read at call time) on a CUDA GPU of compute capability 9.0 or newer
    (griddepcontrol is sm_90 PTX). Never under the Triton interpreter."""
    if (os.environ.get("FASTDCGAN_PDL", "0") != "1"
            or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return False
    return device.type == "cuda" and major_capability(device) >= 9


def launch_options(device):
    """The keyword arguments that make a launch on `device` use PDL or not: the kernel's PDL
    constexpr and, with it, Triton's launch_pdl option. Pass both, always together."""
    if enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
