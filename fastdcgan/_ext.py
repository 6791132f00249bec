"""Loader for the C++ extension fastdcgan._C, and the Python side of its ops.

fastdcgan._C is built by setup.py (`pip install --no-build-isolation -e .`, which `bash dev.sh`
runs) from csrc/. Loading it registers, under torch.ops.fastdcgan:

  adam_step(param!, grad, exp_avg!, exp_avg_sq!, step!, lr, beta1, beta2, eps, weight_decay,
            sync!=None, param_copy!=None) -> ()
      one torch.optim.Adam step (L2 weight decay) over flat fp32 buffers, in place; `step`
      (fp32, one element) is incremented inside the op; `param_copy` (bf16) receives the updated
      parameters rounded to bf16. CPU and (when built with CUDA) CUDA.
  bce_with_logits(logits, targets) -> (loss, grad, mean_prob)
      the logits in len(targets) equal parts, part k labelled targets[k]: the sum of the parts'
      mean BCE-with-logits (fp32), dloss/dlogits and each part's mean sigmoid (fp32), one pass.

This module adds their fake (meta) implementations and the autograd formula of bce_with_logits,
and checks that the compiled extension matches the csrc/ sources next to it (when present): a
missing, stale or CPU-only build raises an error naming the command that rebuilds it.
Set FASTDCGAN_SKIP_EXT_CHECK=1 to skip the staleness check.
"""
import importlib
import os
import threading

import torch

from fastdcgan import _source_hash

__all__ = ["load", "ops", "with_cuda", "check_device", "check_built_from", "csrc_source_hash",
           "ExtensionError"]

REBUILD = "run `bash dev.sh test` or `pip install --no-build-isolation -e .` in the fastdcgan checkout"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCE_ROOT = os.path.dirname(_PACKAGE_DIR)

_lock = threading.Lock()
_module = None


class ExtensionError(ImportError):
    """fastdcgan._C is missing, stale, or lacks the backend asked for."""


def csrc_source_hash(root=_SOURCE_ROOT):
    """The hash setup.py compiles into fastdcgan._C; None without csrc/ sources."""
    return _source_hash.csrc_source_hash(root)


def load():
    """Imports fastdcgan._C once (checking it is built from the current sources), registers the
    Python parts of its ops, and returns the module."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        try:
            mod = importlib.import_module("fastdcgan._C")
        except ImportError as e:
            raise ExtensionError(
                f"the fastdcgan C++ extension (fastdcgan._C) is not built or does not load ({e}); "
                f"{REBUILD}") from e
        if os.environ.get("FASTDCGAN_SKIP_EXT_CHECK") != "1":
            check_built_from(mod, _SOURCE_ROOT)
        _register_python_parts()
        _module = mod
        return mod


def check_built_from(mod, root):
    """Raises ExtensionError when `root` holds csrc/ sources other than those `mod` was built from."""
    expected = csrc_source_hash(root)
    if expected is not None and getattr(mod, "source_hash", None) != "h" + expected:
        raise ExtensionError(
            f"fastdcgan._C ({getattr(mod, '__file__', mod)}) is stale: it was built from other "
            f"csrc/ sources than those in {os.path.join(root, 'csrc')}; {REBUILD} "
            "(or set FASTDCGAN_SKIP_EXT_CHECK=1 to use it anyway)")


def ops():
    """torch.ops.fastdcgan, with the extension loaded."""
    load()
    return torch.ops.fastdcgan


def with_cuda():
    """Whether fastdcgan._C was compiled with its CUDA kernels."""
    return bool(load().with_cuda)


def check_device(device):
    """Raises a clear error if the extension cannot run on `device` (a CPU-only build on a GPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        load()
        return
    if device.type == "cuda" and not with_cuda():
        raise ExtensionError(
            "fastdcgan._C was built without CUDA, so its ops cannot run on "
            f"{device}; rebuild on this machine where torch sees the GPU (torch "
            f"{torch.__version__}, cuda {torch.version.cuda}, available={torch.cuda.is_available()}): "
            "`pip install --no-build-isolation --no-deps -e .` (FASTDCGAN_FORCE_CUDA=1 without a "
            "visible GPU; TORCH_CUDA_ARCH_LIST picks the GPU architectures)")
    if device.type not in ("cpu", "cuda"):
        raise ExtensionError(f"fastdcgan._C has no kernels for device type {device.type!r}")


def _register_python_parts():
    """Fake (meta) implementations for every op, and autograd for bce_with_logits."""

    @torch.library.register_fake("fastdcgan::adam_step")
    def _adam_step_fake(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
                        weight_decay, sync=None, param_copy=None):
        if param_copy is not None:
            torch._check(param_copy.dtype == torch.bfloat16,
                         lambda: "adam_step: param_copy must be bfloat16")
            torch._check(param_copy.numel() == param.numel(),
                         lambda: "adam_step: param_copy and param differ in size")
            torch._check(param_copy.device == param.device,
                         lambda: "adam_step: param_copy on another device")
        for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            torch._check(t.dtype == torch.float32, lambda: f"adam_step: {name} must be float32")
            torch._check(t.numel() == param.numel(),
                         lambda: f"adam_step: {name} and param differ in size")
            torch._check(t.device == param.device, lambda: f"adam_step: {name} on another device")
        torch._check(param.dtype == torch.float32, lambda: "adam_step: param must be float32")
        torch._check(step.dtype == torch.float32 and step.numel() == 1,
                     lambda: "adam_step: step must be a float32 tensor with one element")
        return None

    @torch.library.register_fake("fastdcgan::bce_with_logits")
    def _bce_fake(logits, targets):
        torch._check(logits.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                     lambda: "bce_with_logits: logits must be float32, float64, float16 or bfloat16")
        torch._check(1 <= len(targets) <= 8, lambda: "bce_with_logits: between 1 and 8 targets")
        torch._check(logits.numel() % len(targets) == 0,
                     lambda: "bce_with_logits: the logits do not split into equal parts")
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        loss = logits.new_empty((), dtype=acc)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        return loss, grad, logits.new_empty((len(targets),), dtype=acc)

    def _bce_setup_context(ctx, inputs, output):
        _, grad, mean_prob = output
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(grad, mean_prob)
        # no zero-filled gradients for the unused (non-differentiable) outputs
        ctx.set_materialize_grads(False)

    def _bce_backward(ctx, grad_loss, _grad_grad, _grad_mean_prob):
        (grad,) = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            grad_logits = grad * grad_loss.to(grad.dtype)
        return grad_logits, None

    torch.library.register_autograd("fastdcgan::bce_with_logits", _bce_backward,
                                    setup_context=_bce_setup_context)
