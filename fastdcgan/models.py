"""The pytorch/examples DCGAN (Radford et al. 2015) with a switchable execution backend.

Both networks keep the example's `main = nn.Sequential(...)` with the same module indices, so
state_dict keys and shapes are identical (`main.0.weight`, `main.1.running_mean`, ...) and a
`netG_epoch_24.pth` written by the example loads with `load_state_dict`.

backend:
  "reference": the eager PyTorch modules (cuDNN on GPU).
  "triton":    every conv+BN+activation block through the fused ops in fastdcgan.ops.
  "auto":      triton for CUDA inputs, reference otherwise (chosen per call).

use_kernel_layout() stores the conv weights in the fused kernels' layout (same shapes, values and
state_dict keys, other strides), which the triton backend reads in place and accumulates weight
gradients in; without it each pass copies the weights once. backend="triton" models do it at
construction, the trainer for "auto" on a GPU; the reference backend prefers the plain layout.
"""
import torch
from torch import nn

BACKENDS = ("auto", "reference", "triton")


def resolve_device(device="auto"):
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def weights_init(m):
    """The example's init: conv weights N(0, 0.02); BN weight N(1, 0.02), bias 0."""
    name = m.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def fused_blocks(modules):
    """Groups a (prefix of) `main` into (conv, bn or None, (activation, slope)) blocks."""
    blocks, mods, i = [], list(modules), 0
    while i < len(mods):
        conv, i = mods[i], i + 1
        bn = None
        if i < len(mods) and isinstance(mods[i], nn.BatchNorm2d):
            bn, i = mods[i], i + 1
        act = ("none", 0.0)
        if i < len(mods) and not isinstance(mods[i], (nn.Conv2d, nn.ConvTranspose2d)):
            act, i = _activation_name(mods[i]), i + 1
        blocks.append((conv, bn, act))
    return blocks


def _activation_name(m):
    if isinstance(m, nn.ReLU):
        return "relu", 0.0
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", m.negative_slope
    if isinstance(m, nn.Tanh):
        return "tanh", 0.0
    if isinstance(m, nn.Sigmoid):
        return "sigmoid", 0.0
    if isinstance(m, nn.Identity):
        return "none", 0.0
    raise TypeError(f"no fused activation for {type(m).__name__}")


class _DCGANBase(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = _check_backend(backend)

    def _init_weights(self):
        self.apply(weights_init)
        if self.backend == "triton":
            self.use_kernel_layout()

    def use_kernel_layout(self):
        """Re-stores the conv weights in the fused kernels' layout (see the module docstring);
        call it before building optimizers. Returns self."""
        from fastdcgan.kernels.weights import use_kernel_layout

        use_kernel_layout(self)
        return self

    def set_backend(self, backend):
        self.backend = _check_backend(backend)
        return self

    def uses_triton(self, x):
        """Whether a call on `x` runs the fused kernels (backend "triton", or "auto" on CUDA)."""
        if self.backend == "triton":
            return True
        return self.backend == "auto" and x.is_cuda

    def _check_input(self, x, channels, what):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{what} must be a floating-point tensor, got {x.dtype}")
        p = next(self.parameters())
        if x.device != p.device:
            raise ValueError(f"{what} is on {x.device} but the model is on {p.device}")

    def _run(self, x, modules, groups=1):
        """Runs `modules` (a prefix of main) either eagerly or as fused blocks; with `groups`,
        on that many equal batches of x in turn (one fused pass where it can)."""
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if groups > 1:
            if x.shape[0] % groups:
                raise ValueError(f"a batch of {x.shape[0]} does not split into {groups} equal groups")
            if not self._groups_fuse(x, modules, groups):
                return torch.cat([self._run(part, modules) for part in x.chunk(groups)])
        if not self.uses_triton(x):
            return modules(x)
        from fastdcgan import ops

        return ops.fused_network(x, [_fused_block_args(*b) for b in fused_blocks(modules)], groups)

    def _groups_fuse(self, x, modules, groups):
        """Whether the fused pass can run `groups` batch groups at once (ops.fused_network): not
        with a cumulative-average BatchNorm (momentum None), whose momentum differs per batch."""
        from fastdcgan.kernels.network import grouping_error

        blocks = fused_blocks(modules)
        return (self.uses_triton(x)
                and all(bn is None or bn.momentum is not None for _, bn, _ in blocks)
                and grouping_error(tuple(x.shape), tuple((isinstance(conv, nn.ConvTranspose2d),
                                                          conv.stride[0], conv.padding[0])
                                                         for conv, _, _ in blocks), groups) is None)


def _fused_block_args(conv, bn, act_slope):
    """One block of ops.fused_network from the modules, with nn.BatchNorm2d's forward semantics
    (batch stats when training or without running stats; num_batches_tracked; momentum=None is
    the cumulative average; affine=False is gamma=1, beta=0)."""
    act, slope = act_slope
    block = dict(weight=conv.weight, transposed=isinstance(conv, nn.ConvTranspose2d),
                 stride=conv.stride[0], padding=conv.padding[0], activation=act, negative_slope=slope)
    if bn is None:
        return block
    training = bn.training or bn.running_mean is None
    momentum = bn.momentum
    counter = None
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if momentum is None:   # the cumulative average needs the count on the host
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked)
        else:                  # counted by the BN finalize kernel
            counter = bn.num_batches_tracked
    gamma, beta = bn.weight, bn.bias
    if gamma is None:
        gamma = torch.ones(bn.num_features, device=conv.weight.device)
        beta = torch.zeros(bn.num_features, device=conv.weight.device)
    update = bn.training and bn.track_running_stats
    block.update(gamma=gamma, beta=beta, training=training, momentum=momentum or 0.0, eps=bn.eps,
                 running_mean=bn.running_mean if (update or not training) else None,
                 running_var=bn.running_var if (update or not training) else None,
                 num_batches_tracked=counter)
    return block


class Generator(_DCGANBase):
    """z (B, nz, 1, 1) or (B, nz) -> images (B, nc, 64, 64) in [-1, 1]."""

    def __init__(self, nz=100, ngf=64, nc=3, backend="auto"):
        super().__init__(backend)
        self.nz, self.ngf, self.nc = nz, ngf, nc
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )
        self._init_weights()

    def forward(self, z):
        if isinstance(z, torch.Tensor) and z.dim() == 2:
            z = z[:, :, None, None]
        if isinstance(z, torch.Tensor) and (z.dim() != 4 or z.shape[1:] != (self.nz, 1, 1)):
            raise ValueError(f"latent z must have shape (B, {self.nz}) or (B, {self.nz}, 1, 1), "
                             f"got {tuple(z.shape)}")
        self._check_input(z, self.nz, "latent z")
        return self._run(z, self.main)


class Discriminator(_DCGANBase):
    """images (B, nc, 64, 64) -> probability of real, shape (B,), like the example."""

    def __init__(self, nc=3, ndf=64, backend="auto"):
        super().__init__(backend)
        self.nc, self.ndf = nc, ndf
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
            nn.Sigmoid(),
        )
        self._init_weights()

    def _checked(self, x):
        self._check_input(x, self.nc, "images")
        if x.shape[2:] != (64, 64):
            raise ValueError(f"images must be 64x64, got {tuple(x.shape[2:])}")
        return x

    def logits(self, x, groups=1):
        """Pre-sigmoid scores, shape (B,): what training feeds to BCE-with-logits.

        groups: x holds that many equal batches (e.g. cat(real, fake)), each scored as in a call
        of its own: BatchNorm statistics per batch, running statistics updated batch by batch,
        in order. The triton backend scores them in one fused pass (twice the rows per GEMM for
        two batches, half the launches) when each batch has a multiple of 16 images."""
        x = self._checked(x)
        return self._run(x, self.main[:-1], groups).reshape(-1)

    def forward(self, x):
        x = self._checked(x)
        return self._run(x, self.main).reshape(-1)
