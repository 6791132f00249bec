"""fastdcgan.ops.conv_bn_act against nn.Conv2d + nn.BatchNorm2d + activation in float64.

CPU (Triton interpreter, fp32 with exact dots, and bf16): tiny shapes covering every kernel path
(aligned and flat K, BN train/eval, no BN, GEMV, odd sizes, masked tiles). CUDA: full DCGAN
Discriminator layer shapes in fp32 (TF32 and ieee) and bf16.
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
    """A float64 reference block around nn.Conv2d and its input (precision.make_block)."""
    return make_block(nn.Conv2d, *args, **{"device": DEV, **kw})


def op_params(ref, dtype):
    conv = ref[0]
    w = conv.weight.detach().to(dtype).clone().requires_grad_()
    if isinstance(ref[1], nn.BatchNorm2d):
        norm = ref[1]
        g = norm.weight.detach().float().clone().requires_grad_()
        b = norm.bias.detach().float().clone().requires_grad_()
        return w, g, b, norm.running_mean.float().clone(), norm.running_var.float().clone()
    return w, None, None, None, None


def check(ref, x, dtype, stride, pad, act, training, tol, slope=0.2):
    check_block(ops.conv_bn_act, ref, x, dtype, training, tol, stride=stride, padding=pad,
                activation=act, negative_slope=slope)


# (batch, cin, cout, hw, stride, padding, bn, activation)
CPU_CASES = [
    (3, 8, 16, 8, 2, 1, True, "leaky_relu"),    # flat K (Cin 8), BN
    (2, 16, 12, 16, 2, 1, True, "relu"),        # aligned K, Cout not a power of two, 512 rows
    (3, 3, 8, 8, 2, 1, False, "leaky_relu"),    # D's first layer: Cin 3, no BN
    (3, 12, 8, 7, 2, 1, True, "tanh"),          # odd input 7x7 -> 3x3 (dgrad output masked)
    (2, 8, 16, 5, 1, 0, True, "none"),          # stride 1: 5x5 -> 2x2 (flipped-kernel dgrad)
    (3, 16, 1, 4, 1, 0, False, "sigmoid"),      # D's last layer: GEMV, 4x4 -> 1x1
    (6, 12, 8, 4, 1, 0, True, "leaky_relu"),    # 4x4 -> 1x1 with BN: GEMM + 16-phase dgrad
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
def test_leaky_slope_and_channels_last_input(monkeypatch):
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    ref, x = make_case(2, 8, 8, 8, 2, 1, True, "leaky_relu", slope=0.05)
    check(ref, x.contiguous(memory_format=torch.channels_last), torch.float32, 2, 1, "leaky_relu",
          True, tol=2e-5, slope=0.05)


@interpreter_only
def test_no_grad_matches(monkeypatch):
    """Without autograd the op goes straight to the kernels (no saved tensors)."""
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    ref, x = make_case(2, 8, 16, 8, 2, 1, True, "leaky_relu")
    w, g, b, rm, rv = op_params(ref, torch.float32)
    with torch.no_grad():
        out = ops.conv_bn_act(x.float(), w, g, b, rm, rv)
        expect = ref(x)
    assert rel_err(out, expect) < 2e-5
    assert rel_err(rm, ref[1].running_mean) < 2e-5


def _args(cin=8, cout=16):
    return dict(x=torch.randn(2, cin, 8, 8, device=DEV), weight=torch.randn(cout, cin, 4, 4, device=DEV),
                gamma=torch.ones(cout, device=DEV), beta=torch.zeros(cout, device=DEV),
                running_mean=torch.zeros(cout, device=DEV), running_var=torch.ones(cout, device=DEV))


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.randn(2, 8, 8)), "4-D"),
    (dict(x=torch.randn(2, 8, 8, 8, dtype=torch.float64)), "dtype"),
    (dict(x=torch.randint(0, 3, (2, 8, 8, 8))), "dtype"),
    (dict(x=torch.randn(2, 5, 8, 8)), "channels"),
    (dict(weight=torch.randn(16, 8, 3, 3)), "kernel size 4"),
    (dict(weight=torch.randn(16, 8, 4)), "4-D"),
    (dict(gamma=torch.ones(15)), "gamma"),
    (dict(running_var=None), "running_var"),
    (dict(stride=3), "stride"),
    (dict(stride=1, padding=1), "stride"),
    (dict(activation="gelu"), "activation"),
    (dict(x=torch.randn(2, 8, 1, 1)), "too small"),
    (dict(x=torch.randn(1, 8, 4, 4), stride=1, padding=0), "more than 1 value"),
    (dict(gamma=None), "gamma=None"),
])
def test_validation(change, match):
    kw = _args()
    kw.update({k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    x, w = kw.pop("x"), kw.pop("weight")
    tensors = [kw.pop(k) for k in ("gamma", "beta", "running_mean", "running_var")]
    with pytest.raises(ValueError, match=match):
        ops.conv_bn_act(x, w, *tensors, **kw)


def test_validation_eval_needs_running_stats():
    kw = _args()
    with pytest.raises(ValueError, match="running_mean"):
        ops.conv_bn_act(kw["x"], kw["weight"], kw["gamma"], kw["beta"], None, None, training=False)


@needs_cuda
def test_device_mismatch():
    kw = _args()
    with pytest.raises(ValueError, match="cpu"):
        ops.conv_bn_act(kw["x"], kw["weight"].cpu(), kw["gamma"], kw["beta"], kw["running_mean"],
                        kw["running_var"])


# Discriminator layers at full DCGAN width (ndf=64) on the GPU
GPU_LAYERS = [
    (3, 64, 64, 2, 1, False, "leaky_relu"),
    (64, 128, 32, 2, 1, True, "leaky_relu"),
    (128, 256, 16, 2, 1, True, "leaky_relu"),
    (256, 512, 8, 2, 1, True, "leaky_relu"),
    (512, 1, 4, 1, 0, False, "sigmoid"),
]


@needs_cuda
@pytest.mark.parametrize("layer, mode, training", gpu_cases(GPU_LAYERS), ids=gpu_case_id)
def test_dcgan_layers_gpu(layer, mode, training, monkeypatch):
    cin, cout, hw, stride, pad, bn, act = layer
    dtype = gpu_mode(mode, monkeypatch)
    ref, x = make_case(32, cin, cout, hw, stride, pad, bn, act, dtype=dtype)
    check(ref, x, dtype, stride, pad, act, training, tol=GPU_TOL[mode])


def test_short_reductions_use_fp32_accurate_dots(monkeypatch):
    """TF32 GEMMs, except the memory-bound ones with K <= 128 (D's first layer, G's first):
    exact fp32 there, so their rounding does not flip activation derivatives (as cuDNN's exact
    small-K kernels do not); FASTDCGAN_FP32_PRECISION=ieee makes every fp32 GEMM exact."""
    from fastdcgan.kernels.implicit_gemm import _dot_prec

    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "tf32")
    assert _dot_prec(torch.float32, 3 * 16) == "ieee"
    assert _dot_prec(torch.float32, 100) == "ieee"
    assert _dot_prec(torch.float32, 64 * 4) == "tf32"
    assert _dot_prec(torch.float32) == "tf32"
    monkeypatch.setenv("FASTDCGAN_FP32_PRECISION", "ieee")
    assert _dot_prec(torch.float32, 48) == "ieee" and _dot_prec(torch.float32, 4096) == "ieee"


def test_a_config_too_big_for_shared_memory_runs_with_fewer_stages():
    """A tuned tile whose pipeline does not fit (a forward shape's tile reused by a data gradient,
    which stages two operand tensors) is launched again with one stage fewer until it fits, and
    the depth that fitted is remembered."""
    import triton
    from triton.runtime.errors import OutOfResources

    from fastdcgan.kernels import implicit_gemm as ig

    class FakeKernel:
        def __init__(self):
            self.tried = []

        def __getitem__(self, grid):
            def run(*args, num_stages, **kw):
                self.tried.append(num_stages)
                if num_stages > 2:
                    raise OutOfResources(240000, 232448, "shared memory")
            return run

    kernel = FakeKernel()
    cfg = triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=4)
    ig._launch_one(kernel, lambda meta: (1,), (), {"MODE": 2}, cfg)
    assert kernel.tried == [4, 3, 2]
    ig._launch_one(kernel, lambda meta: (1,), (), {"MODE": 2}, cfg)
    assert kernel.tried == [4, 3, 2, 2]
    ig._FITTED_STAGES.clear()


def test_gemm_tiles_keep_their_accumulator_within_the_register_budget():
    """_fit_registers: 8 warps first, then a halved BLOCK_M (a halved BLOCK_N at BLOCK_M 64)."""
    from fastdcgan.kernels.implicit_gemm import _fit_registers

    assert _fit_registers(128, 128, 4, 128) == (128, 128, 4)      # 128 registers: fits
    assert _fit_registers(128, 128, 4, 64) == (128, 128, 8)       # the data gradient's budget
    assert _fit_registers(256, 128, 8, 64) == (128, 128, 8)
    assert _fit_registers(64, 256, 8, 32) == (64, 128, 8)
