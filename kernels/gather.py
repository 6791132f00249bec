"""The trainer's batch gather in one kernel: rows `idx` of the GPU-resident uint8 NHWC image set,
mapped to float32 as x * scale + shift with the eager ops' two roundings (so the multiply-add
must not be fused into an FMA), then to the output dtype (bf16 for a bf16 step: the cast the
network would otherwise launch), written NHWC and returned as an NCHW-shaped channels_last view:
the layout the fused network reads as is (no permute copy) and cuDNN takes directly. Replaces
index_select + permute/convert + mul + add.
"""
import torch
import triton
import triton.language as tl

from .grid import cdiv
from .pdl import grid_dependency_wait, launch_options

# One program: BLOCK elements (16 KB of fp32 output) of one image; images are 64*64*3 = 12288
# bytes, so a 64x64 batch of 128 is 128 x 3 programs.
BLOCK = 4096


@triton.jit
def gather_normalize_kernel(src_ptr, idx_ptr, out_ptr, IMAGE, scale, shift, BLOCK: tl.constexpr,
                            PDL: tl.constexpr):
    grid_dependency_wait(PDL)
    img = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < IMAGE
    row = tl.load(idx_ptr + img).to(tl.int64)
    v = tl.load(src_ptr + row * IMAGE + offs, mask=ok, other=0).to(tl.float32)
    out = v * scale + shift
    tl.store(out_ptr + img.to(tl.int64) * IMAGE + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def gather_normalize(images_u8, idx, scale, shift, dtype=torch.float32):
    """images_u8: (N, H, W, C) uint8 on the GPU; idx: (B,) int64 indices on the same device.
    Returns (B, C, H, W) images[idx] * scale + shift (computed in fp32) in `dtype`, channels_last."""
    n, h, w, c = images_u8.shape
    out = torch.empty(idx.numel(), h, w, c, device=images_u8.device, dtype=dtype)
    image = h * w * c
    gather_normalize_kernel[(idx.numel(), cdiv(image, BLOCK))](
        images_u8, idx, out, image, float(scale), float(shift), BLOCK=BLOCK, enable_fp_fusion=False,
        **launch_options(images_u8.device))
    return out.permute(0, 3, 1, 2)
