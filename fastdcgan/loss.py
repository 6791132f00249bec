"""Fused BCE-with-logits: the loss value and its gradient in one pass of the C++ extension.

    loss = mean(max(l, 0) - l * t + log1p(exp(-|l|)))      (stable for any |l|)
    dloss/dl = (sigmoid(l) - t) / N                          (N = logits.numel())

`bce_with_logits` is autograd-aware: the forward op returns both, the gradient is saved, and the
backward only scales it by grad_output (no second pass over the logits).

`bce_with_logits_of_parts` is a whole GAN loss in that one pass: the logits of several batches
one after the other (D's real and fake scores), each batch with its own constant label, the sum
of the batches' mean losses, the gradient, and each batch's mean sigmoid (D(x), D(G(z))). A
training step feeds the gradient to `torch.autograd.backward(logits, grad)`: no autograd seed,
no dtype casts, no loss-scaling kernels around it.
"""
import torch

from fastdcgan import _ext

__all__ = ["bce_with_logits", "bce_with_logits_and_grad", "bce_with_logits_of_parts"]


def _checked(logits, targets):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if any(isinstance(t, torch.Tensor) for t in targets):
        raise TypeError("target must be a Python number (a constant label such as 1.0 or 0.0); "
                        "for per-element targets use F.binary_cross_entropy_with_logits")
    _ext.check_device(logits.device)
    return [float(t) for t in targets]


def bce_with_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Mean binary cross-entropy of `logits` against the constant label `target`.

    Equals F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target)); returns a
    0-d tensor of logits' dtype that backpropagates into `logits`."""
    loss, _, _ = _ext.ops().bce_with_logits(logits, _checked(logits, [target]))
    return loss.to(logits.dtype)


def bce_with_logits_and_grad(logits: torch.Tensor, target: float):
    """(loss, dloss/dlogits) without autograd: for hand-written backward passes."""
    with torch.no_grad():
        loss, grad, _ = _ext.ops().bce_with_logits(logits, _checked(logits, [target]))
    return loss.to(logits.dtype), grad


def bce_with_logits_of_parts(logits: torch.Tensor, targets):
    """(loss, grad, mean_prob) of `logits` split into len(targets) equal parts, part k labelled
    targets[k], without autograd:
      loss      = sum over the parts of their mean BCE-with-logits (0-d, fp32; fp64 for fp64
                  logits): for D's [real; fake] scores and targets (1, 0), pytorch/examples'
                  errD_real + errD_fake;
      grad      = dloss/dlogits, the logits' dtype and shape;
      mean_prob = each part's mean sigmoid (len(targets), fp32; fp64 for fp64 logits).
    At most 8 parts; logits.numel() must be a multiple of their number."""
    targets = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    with torch.no_grad():
        return _ext.ops().bce_with_logits(logits, _checked(logits, targets))
