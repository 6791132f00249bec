"""Data-parallel training on torch.distributed: one process per GPU (or CPU worker), launched by
torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.

    torchrun --nproc_per_node=8 -m fastdcgan.train ...            # every rank runs the same command

Each rank trains on its own shard of every global batch (fastdcgan.data.EpochBatches) and
`average_gradients` all-reduces each network's flat FusedAdam gradient buffer once per step, so
every rank applies the same update to the same parameters. BatchNorm normalises with each rank's
own batch statistics unless sync BN is on (`use_sync_batchnorm`): then the per-channel statistics
of the global batch, in forward and backward, for both model backends.

Without a process group (a plain `python -m fastdcgan.train`) every helper here is a no-op for
world size 1. Every collective has the process group's timeout (--dist-timeout); one that fails
(a rank died, stalled or was killed) raises PeerFailure with what happened, instead of hanging.

Backends: NCCL for CUDA tensors and gloo for CPU tensors, one process group for both (the
helpers below expect that group, or another one that takes CPU tensors).
"""
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DEFAULT_TIMEOUT_S", "PeerFailure", "SyncBatchNorm2d", "any_rank", "average_gradients",
           "barrier", "check_same", "init_from_env", "local_rank", "mean_over_ranks", "rank",
           "rank_device", "shutdown", "use_sync_batchnorm", "world_size"]

DEFAULT_TIMEOUT_S = 600.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_timeout_s = None  # the timeout init_from_env gave the process group (for error messages)


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, stalled past the timeout, or was stopped."""


def init_from_env(timeout_s=DEFAULT_TIMEOUT_S):
    """Joins the process group torchrun describes in the environment; returns the world size.

    WORLD_SIZE unset or 1 (a plain `python -m`): no process group, returns 1. A collective (and
    the rendezvous itself) waits at most `timeout_s` seconds for the other ranks."""
    global _timeout_s
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout must be positive, got {timeout_s}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1
    missing = [k for k in _TORCHRUN_VARS if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun "
                         "(python -m torch.distributed.run), which sets them")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    _timeout_s = timeout_s
    _collective(dist.init_process_group, backend, timeout=datetime.timedelta(seconds=timeout_s),
                what=f"joining the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    return world


def shutdown():
    """Leaves the process group (after a run that ended normally: every rank is here)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank():
    return int(os.environ.get("LOCAL_RANK", "0")) if dist.is_initialized() else 0


def rank_device(device):
    """With several ranks a CUDA device means this rank's own GPU, cuda:LOCAL_RANK (made current)."""
    if world_size() == 1 or not device.startswith("cuda"):
        return device
    local, count = local_rank(), torch.cuda.device_count()
    if local >= count:
        raise ValueError(f"rank {rank()} has LOCAL_RANK {local} but this machine has {count} GPUs: "
                         f"start at most {count} processes per node (torchrun --nproc_per_node)")
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def _collective(op, *args, what, **kwargs):
    try:
        op(*args, **kwargs)
    except RuntimeError as e:
        timeout = f"{_timeout_s:g} s (--dist-timeout)" if _timeout_s else "the process group's timeout"
        who = f"rank {os.environ.get('RANK', rank())} of {os.environ.get('WORLD_SIZE', world_size())}"
        raise PeerFailure(
            f"{who}: {what} failed: another rank died, was stopped or did "
            f"not answer within {timeout}; see the other ranks' output. The checkpoint on disk is "
            f"the last one written. ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        ) from e


def average_gradients(optimizer):
    """Replaces the gradients of a FusedAdam by their mean over the ranks: one all-reduce per
    parameter group, on the flat gradient buffer that backward wrote into (FusedAdam.zero_grad
    keeps the parameters' .grad views of it). No host sync, so it can sit inside a CUDA graph."""
    world = world_size()
    if world == 1:
        return
    for group in range(len(optimizer.param_groups)):
        grad = optimizer.flat_buffers(group)["grad"]
        _collective(dist.all_reduce, grad, what="gradient all-reduce")
        grad.div_(world)


def mean_over_ranks(stats):
    """{name: 0-d tensor} -> {name: float}, each the mean over the ranks (one host sync)."""
    values = torch.stack([v.detach().float() for v in stats.values()])
    if world_size() > 1:
        _collective(dist.all_reduce, values, what="loss all-reduce")
        values /= world_size()
    return dict(zip(stats, values.tolist()))


def any_rank(flag):
    """True on every rank when `flag` is true on any (a host sync: call it where the ranks sync)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(flag)])  # a CPU tensor: gloo, also in init_from_env's CUDA group
    _collective(dist.all_reduce, t, dist.ReduceOp.MAX, what="stop-flag all-reduce")
    return bool(t.item())


def barrier():
    if world_size() > 1:
        _collective(dist.barrier, what="barrier")


def check_same(value, what):
    """Raises ValueError on every rank unless `value` (picklable) is the same on all of them."""
    if world_size() == 1:
        return
    values = [None] * world_size()
    _collective(dist.all_gather_object, values, value, what=f"{what} check")
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise ValueError(f"the ranks disagree on the {what}: rank {differ[0]} has {values[differ[0]]!r}, "
                         f"rank 0 {values[0]!r}; launch every rank with the same command")


# ---- sync BN --------------------------------------------------------------------------------
def use_sync_batchnorm(modules, enabled):
    """Makes the BatchNorm layers of `modules` (fastdcgan models) normalise with the global
    batch's statistics when `enabled` and there are several ranks.

    Reference backend: each nn.BatchNorm2d is replaced by a SyncBatchNorm2d sharing its
    parameters and buffers (call this before building the optimizers). Triton backend: the
    process-wide gather of BN partials in fastdcgan.kernels.bn, installed -- or, when not
    enabled, removed -- whenever one of the models may run its fused kernels.
    Every rank must call the models with the same batch shape (the trainer's shards have one)."""
    world = world_size()
    sync = enabled and world > 1
    if sync:
        for module in modules:
            for parent in list(module.modules()):
                for name, child in parent.named_children():
                    if type(child) is nn.BatchNorm2d:
                        setattr(parent, name, SyncBatchNorm2d.sharing(child))
    if any(_may_run_triton(m) for m in modules):
        from fastdcgan.kernels import bn

        bn.set_partials_sync(_PartialsGather(world) if sync else None)


def _may_run_triton(model):
    return model.backend == "triton" or (model.backend == "auto" and next(model.parameters()).is_cuda)


def _all_gather_rows(flat, what):
    """[world size, n]: row r is rank r's 1-D `flat` (n elements on every rank)."""
    out = flat.new_empty(world_size() * flat.numel())  # gloo takes the flat form only
    _collective(dist.all_gather_single, out, flat, what=what)
    return out.view(world_size(), -1)


class _PartialsGather:
    """fastdcgan.kernels.bn's sync-BN hook: a tuple of per-tile partial tensors -> the same
    tensors of every rank concatenated along dim 0 (rank order), in one all-gather."""

    def __init__(self, world):
        self.world_size = world

    def gather(self, tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        rows = _all_gather_rows(flat, "sync-BN statistics all-gather")
        out, start = [], 0
        for t in tensors:
            part = rows[:, start:start + t.numel()]  # a strided view: the kernels need rows packed
            out.append(part.reshape(self.world_size * t.shape[0], *t.shape[1:]).contiguous())
            start += t.numel()
        return tuple(out)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are those of the batch over all ranks;
    eval mode and world size 1 are plain BatchNorm2d. torch.nn.SyncBatchNorm runs on GPUs only;
    this runs wherever the process group does (gloo on CPU, NCCL on CUDA). Same state_dict."""

    @classmethod
    def sharing(cls, bn):
        if not (bn.affine and bn.track_running_stats):
            raise ValueError("SyncBatchNorm2d needs affine=True and track_running_stats=True")
        sync = cls(bn.num_features, bn.eps, bn.momentum, device=bn.weight.device)
        sync.weight, sync.bias = bn.weight, bn.bias
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
        return sync.train(bn.training)

    def forward(self, x):
        if not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean,
                                            self.running_var, momentum, self.eps)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training BN over the global batch. Forward: per-rank (count, mean, M2) all-gathered and
    merged (Chan), running stats updated as F.batch_norm does for the global batch. Backward: the
    per-channel sums of dy and dy*xhat all-reduced; the returned dgamma/dbeta are this rank's
    sums, so average_gradients yields those of the global batch's loss, and dx carries the
    world-size factor that the same average removes from the upstream weight gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        xf = x.float()
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        local = torch.cat([mean.new_full((1,), count), mean, var * count])
        rows = _all_gather_rows(local, "sync-BN statistics all-gather")
        n_r, mean_r, m2_r = rows[:, :1], rows[:, 1:1 + mean.numel()], rows[:, 1 + mean.numel():]
        n = n_r.sum()
        mean = (n_r * mean_r).sum(0) / n
        m2 = (m2_r + n_r * (mean_r - mean) ** 2).sum(0)
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(m2 / (n - 1), alpha=momentum)
        rstd = torch.rsqrt(m2 / n + eps)
        xhat = (xf - mean[:, None, None]) * rstd[:, None, None]
        ctx.save_for_backward(xhat, weight, rstd)
        ctx.count = n
        return (xhat * weight[:, None, None] + bias[:, None, None]).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xhat, weight, rstd = ctx.saved_tensors
        dyf = dy.float()
        local = torch.cat([dyf.sum((0, 2, 3)), (dyf * xhat).sum((0, 2, 3))])
        sums = local.clone()
        _collective(dist.all_reduce, sums, what="sync-BN gradient all-reduce")
        sum_dy, sum_dy_xhat = (sums / ctx.count).chunk(2)
        dx = (weight * rstd)[:, None, None] * (dyf - sum_dy[:, None, None] - xhat * sum_dy_xhat[:, None, None])
        dbias, dweight = local.chunk(2)
        return dx.to(dy.dtype), dweight, dbias, None, None, None, None

