"""fastdcgan.ops.conv_transpose_bn_act against nn.ConvTranspose2d + nn.BatchNorm2d + activation
in float64.

CPU (Triton interpreter, fp32 with exact dots, and bf16): tiny shapes covering the 4-phase
stride-2 GEMMs, the 16-phase 1x1 -> 4x4 first layer, the flipped-kernel stride-1 path, Cout = 3,
odd sizes, BN train/eval. CUDA: full DCGAN Generator layer shapes in fp32 (TF32 and ieee) and bf16.
"""
import pytest
import torch
from torch import nn

from fastdcgan import ops
from precision import (
    check_block, DEV, gpu_case_id, gpu_cases, gpu_mode, GPU_TOL, interpreter_only, make_block,
    needs_cuda, rel_err)

pytestmark = pytest.mark.usefixtures("poison")


def make_case(*args, **kw):
    """A float64 reference block around nn.ConvTranspose2d and its input (precision.make_block)."""
    return make_block(nn.ConvTranspose2d, *args, **{"device": DEV, **kw})


def check(ref, x, dtype, stride, pad, act, training, tol):
    check_block(ops.conv_transpose_bn_act, ref, x, dtype, training, tol, stride=stride, padding=pad,
                activation=act)


# (batch, cin, cout, hw, stride, padding, bn, activation)
CPU_CASES = [
    (3, 16, 8, 4, 2, 1, True, "relu"),          # aligned K, 4 phases
    (2, 12, 8, 8, 2, 1, True, "relu"),          # flat K
    (3, 12, 16, 1, 1, 0, True, "relu"),         # G's first layer: 1x1 -> 4x4, 16 phase GEMMs
    (2, 8, 3, 8, 2, 1, False, "tanh"),          # G's last layer: Cout 3, no BN
    (2, 8, 12, 3, 2, 1, True, "leaky_relu"),    # odd input 3x3 -> 6x6
    (2, 8, 8, 2, 1, 0, True, "sigmoid"),        # stride 1 from 2x2 -> 5x5 (flipped kernel)
    (2, 16, 8, 16, 2, 1, True, "none"),         # 2048 rows: the interpreter's large tiles
]


@interpreter_only
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "b{}_{}to{}_{}x{}_s{}p{}_{}_{}".format(
    c[0], c[1], c[2], c[3], c[3], c[4], c[5], "bn" if c[6] else "nobn", c[7]))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, GPU_TOL["bf16"])],
                         ids=["fp32", "bf16"])
def test_small(case, training, dtype, tol, monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    b, cin, cout, hw, stride, pad, bn, act = case
    if not bn and not training:
        pytest.skip("no BatchNorm: eval is the same as train")
    ref, x = make_case(b, cin, cout, hw, stride, pad, bn, act, dtype=dtype)
    check(ref, x, dtype, stride, pad, act, training, tol=tol)


@interpreter_only
def test_returns_channels_last_and_chains():
    """Output is channels_last (free NHWC view); feeding it to the next op needs no copy."""
    x = torch.randn(2, 8, 4, 4, device=DEV)
    w1, w2 = torch.randn(8, 12, 4, 4, device=DEV) * 0.1, torch.randn(12, 4, 4, 4, device=DEV) * 0.1
    g, b = torch.ones(12, device=DEV), torch.zeros(12, device=DEV)
    with torch.no_grad():
        h = ops.conv_transpose_bn_act(x, w1, g, b, None, None)
        assert h.is_contiguous(memory_format=torch.channels_last)
        y = ops.conv_transpose_bn_act(h, w2, None, None, None, None, activation="tanh")
        hr = torch.relu(torch.nn.functional.batch_norm(
            torch.nn.functional.conv_transpose2d(x, w1, stride=2, padding=1), None, None, g, b, True))
        yr = torch.tanh(torch.nn.functional.conv_transpose2d(hr, w2, stride=2, padding=1))
    assert y.shape == (2, 4, 16, 16)
    assert rel_err(y, yr) < 1e-3


@pytest.mark.parametrize("change, match", [
    (dict(weight=torch.randn(16, 8, 4, 4)), "channels"),     # ConvT layout is (Cin, Cout, 4, 4)
    (dict(stride=2, padding=0), "stride"),
    (dict(beta=torch.zeros(8), gamma=None), "gamma=None"),
])
def test_validation(change, match):
    kw = dict(x=torch.randn(2, 8, 4, 4), weight=torch.randn(8, 16, 4, 4), gamma=torch.ones(16),
              beta=torch.zeros(16), running_mean=None, running_var=None)
    kw.update(change)
    kw = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    x, w = kw.pop("x"), kw.pop("weight")
    tensors = [kw.pop(k) for k in ("gamma", "beta", "running_mean", "running_var")]
    with pytest.raises(ValueError, match=match):
        ops.conv_transpose_bn_act(x, w, *tensors, **kw)


# Generator layers at full DCGAN width (nz=100, ngf=64) on the GPU
GPU_LAYERS = [
    (100, 512, 1, 1, 0, True, "relu"),
    (512, 256, 4, 2, 1, True, "relu"),
    (256, 128, 8, 2, 1, True, "relu"),
    (128, 64, 16, 2, 1, True, "relu"),
    (64, 3, 32, 2, 1, False, "tanh"),
]


@needs_cuda
@pytest.mark.parametrize("layer, mode, training", gpu_cases(GPU_LAYERS), ids=gpu_case_id)
def test_dcgan_layers_gpu(layer, mode, training, monkeypatch):
    cin, cout, hw, stride, pad, bn, act = layer
    dtype = gpu_mode(mode, monkeypatch)
    ref, x = make_case(32, cin, cout, hw, stride, pad, bn, act, dtype=dtype)
    check(ref, x, dtype, stride, pad, act, training, tol=GPU_TOL[mode])
