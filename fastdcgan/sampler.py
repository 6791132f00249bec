"""Fast repeated sampling: an eval-mode Generator captured once in a CUDA graph and replayed.

Generator inference at a few hundred images is a millisecond of GPU work behind as much host
work (validation and a dozen kernel launches from Python per call); a CUDA graph replays the
whole forward with one launch, so repeated sampling (evaluation, sample grids, serving) runs at
the GPU's speed.
"""
import torch


def _check_eval(G):
    if any(m.training for m in G.modules()):
        raise ValueError("CapturedGenerator needs G in eval mode (G.eval()): a training-mode "
                         "BatchNorm would normalise with batch statistics and update its running "
                         "statistics at every call")


class CapturedGenerator:
    """`sampler(z)` -> G(z) for latents z of shape (batch_size, nz) or (batch_size, nz, 1, 1)
    on G's device, G in eval mode, without gradients.

    On CUDA (capture=True) G is warmed up on a side stream and `G(z_static)` captured in a CUDA
    graph; each call copies z into the static buffer (cast to `dtype`, default G's parameter
    dtype) and replays. The returned tensor is the graph's static output, overwritten by the
    next call: pass clone=True (or clone it) to keep it. Elsewhere, or with capture=False, each
    call runs G(z) as is (same interface, a fresh output per call).

    The graph reads G's parameters and BN buffers in place, so in-place updates (load_state_dict,
    optimizer steps) are seen by later calls; replacing a tensor (`p.data = ...`, `G.to(...)`,
    use_kernel_layout()) is not: the graph keeps reading the old storage (kept alive here).
    G runs outside autocast: choose the compute dtype with the model's dtype and `dtype`.
    """

    def __init__(self, G, batch_size, dtype=None, *, capture=True):
        _check_eval(G)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        param = next(G.parameters())
        self.dtype = param.dtype if dtype is None else dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {self.dtype}")
        self.G, self.batch_size, self.nz, self.device = G, batch_size, G.nz, param.device
        self.graph = None
        if capture and self.device.type == "cuda":
            self.z = torch.zeros(batch_size, self.nz, 1, 1, device=self.device, dtype=self.dtype)
            with torch.cuda.device(self.device):
                self.graph, self.out = self._capture()
            # the graph holds raw pointers: keep the storages it reads alive if G's are replaced
            self._kept = [t.detach() for t in (*G.parameters(), *G.buffers())]

    @property
    def captured(self):
        """Whether calls replay a CUDA graph."""
        return self.graph is not None

    def _run(self, z):
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return self.G(z)

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # as capture requires: Triton compiles its kernels and cuDNN picks its algorithms
            # here, not while capturing
            for _ in range(2):
                self._run(self.z)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side):
                out = self._run(self.z)
        except RuntimeError as e:
            raise RuntimeError(
                f"capturing the generator in a CUDA graph failed ({e}); sample without capture "
                "(CapturedGenerator(..., capture=False), generate's --no-cuda-graph) and please "
                "report this") from e
        return graph, out

    def _check(self, z):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"latent z must be a torch.Tensor, got {type(z).__name__}")
        if tuple(z.shape) not in ((self.batch_size, self.nz), (self.batch_size, self.nz, 1, 1)):
            raise ValueError(f"latent z must have shape ({self.batch_size}, {self.nz}) or "
                             f"({self.batch_size}, {self.nz}, 1, 1), got {tuple(z.shape)}")
        if z.device != self.device:
            raise ValueError(f"latent z is on {z.device} but the generator is on {self.device}")
        if not z.is_floating_point():
            raise ValueError(f"latent z must be a floating-point tensor, got {z.dtype}")

    def __call__(self, z, clone=False):
        self._check(z)
        if self.G.training:
            _check_eval(self.G)
        if self.graph is None:
            return self._run(z.to(self.dtype))
        self.z.copy_(z.reshape(self.z.shape))
        self.graph.replay()
        return self.out.clone() if clone else self.out
