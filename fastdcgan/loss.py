"""Fused BCE-with-logits: the loss value and its gradient in one pass of the C++ extension.

    loss = mean(max(l, 0) - l * t + log1p(exp(-|l|)))      (stable for any |l|)
    dloss/dl = (sigmoid(l) - t) / N                          (N = logits.numel())

`bce_with_logits` is autograd-aware: the forward op returns both, the gradient is saved, and the
backward only scales it by grad_output (no second pass over the logits).
"""
import torch

from fastdcgan import _ext

__all__ = ["bce_with_logits", "bce_with_logits_and_grad"]


def _checked(logits, target):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if isinstance(target, torch.Tensor):
        raise TypeError("target must be a Python number (a constant label such as 1.0 or 0.0); "
                        "for per-element targets use F.binary_cross_entropy_with_logits")
    _ext.check_device(logits.device)
    return float(target)


def bce_with_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Mean binary cross-entropy of `logits` against the constant label `target`.

    Equals F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target)); returns a
    0-d tensor of logits' dtype that backpropagates into `logits`."""
    loss, _ = _ext.ops().bce_with_logits(logits, _checked(logits, target))
    return loss


def bce_with_logits_and_grad(logits: torch.Tensor, target: float):
    """(loss, dloss/dlogits) without autograd: for hand-written backward passes."""
    with torch.no_grad():
        return _ext.ops().bce_with_logits(logits, _checked(logits, target))
