"""FusedAdam: torch.optim.Adam over one flat buffer per parameter group, one fused op per step.

Packing. When a parameter group is added, its parameters are copied into one flat fp32 buffer and
each parameter's storage is replaced by a view into it (`p.data` is a view; shapes and strides,
hence memory format, are kept; each view starts at a 64-byte boundary). Gradients get the same
treatment: `p.grad` is set once to a view of a flat gradient buffer, so backward accumulates
straight into it, and exp_avg / exp_avg_sq are flat too. One step is then a single call of
torch.ops.fastdcgan.adam_step per group: one kernel launch on CUDA, one parallel vectorised pass on
CPU. The step count is a tensor on the parameters' device, incremented inside the op, so the step
can be captured in a CUDA graph and replayed.

Gradients and zero_grad.
  * `FusedAdam.zero_grad()` zeroes the flat gradient buffer in place and keeps the views, whatever
    `set_to_none` says (setting grads to None would detach them from the flat buffer; keeping them
    is also what CUDA-graph capture needs). Prefer it to `module.zero_grad()`.
  * If a gradient was replaced anyway (`module.zero_grad()` sets `p.grad = None`, after which
    backward allocates a fresh tensor; or a user assigns `p.grad`), `step()` notices, copies the
    new gradient into the flat buffer and points `p.grad` back at its view (one extra copy).
  * A parameter whose `.grad` is None at step time counts as a zero gradient (its moments still
    decay and it still moves); torch.optim.Adam skips such a parameter instead. When every grad
    of a group is None the group is skipped, as torch.optim.Adam does.
  * Replacing a parameter's storage after construction (`p.data = ...`, moving the module to
    another device) is detected at the next step and raises; build the optimizer after the model
    is on its device. In-place writes (`module.load_state_dict`, `p.copy_`) are fine.

Hyperparameters (lr, betas, eps, weight_decay) are read from param_groups at every step and may
be changed between steps (a captured CUDA graph keeps the values it was captured with). Each group
has its own flat buffers, so groups may differ in hyperparameters.

state_dict() has torch.optim.Adam's format (per-parameter 'step', 'exp_avg', 'exp_avg_sq'), so a
torch.optim.Adam can load it, and load_state_dict() accepts a torch.optim.Adam state_dict of the
same parameters (old checkpoints resume).

Usage (the DCGAN loop):
    netD.to(device); optD = FusedAdam(netD.parameters())     # build after moving the model
    optD.zero_grad()                                         # not netD.zero_grad()
    loss = bce_with_logits(netD.logits(real), 1.0) + bce_with_logits(netD.logits(fake), 0.0)
    loss.backward()                                          # grads land in the flat buffer
    optD.step()                                              # one fastdcgan::adam_step
Code that computes gradients itself should write them into `p.grad` in place (they are views);
assigning a new tensor to `p.grad` works but costs a copy at the next step.

Not supported (raise): amsgrad, maximize, decoupled weight decay (AdamW), sparse gradients,
parameters that are not float32 or do not require grad, parameters of one group on different
devices, a torch.optim.Adam state whose parameters are at different step counts.
"""
import torch

from fastdcgan import _ext

__all__ = ["FusedAdam"]

_ALIGN = 16  # elements: every parameter view starts on a 64-byte boundary


def _is_dense(shape, stride):
    """True when (shape, stride) covers exactly prod(shape) consecutive elements (any dim order)."""
    expected = 1
    for st, sz in sorted((st, sz) for sz, st in zip(shape, stride) if sz != 1):
        if st != expected:
            return False
        expected *= sz
    return True


def _contiguous_strides(shape):
    strides, acc = [], 1
    for sz in reversed(shape):
        strides.append(acc)
        acc *= max(sz, 1)
    return tuple(reversed(strides))


class _FlatGroup:
    """The flat buffers of one parameter group and the views handed out of them."""

    def __init__(self, params):
        device = params[0].device
        self.params = list(params)
        self.offsets, strides, off = [], [], 0
        for p in self.params:
            self.offsets.append(off)
            strides.append(p.stride() if _is_dense(p.shape, p.stride()) else _contiguous_strides(p.shape))
            off += (p.numel() + _ALIGN - 1) // _ALIGN * _ALIGN
        self.strides = strides
        zeros = dict(dtype=torch.float32, device=device)
        self.param = torch.zeros(off, **zeros)
        self.grad = torch.zeros(off, **zeros)
        self.exp_avg = torch.zeros(off, **zeros)
        self.exp_avg_sq = torch.zeros(off, **zeros)
        self.step = torch.zeros((), **zeros)
        self.sync = torch.zeros(1, dtype=torch.int32, device=device)  # CUDA block counter, stays 0
        self.copy = None           # bf16 copy of `param` that step() rewrites (bf16_copies)
        self.copy_versions = None  # the parameters' versions when `copy` was last written
        self.param_views = [self._view(self.param, i) for i in range(len(self.params))]
        self.grad_views = [self._view(self.grad, i) for i in range(len(self.params))]
        self.exp_avg_views = [self._view(self.exp_avg, i) for i in range(len(self.params))]
        self.exp_avg_sq_views = [self._view(self.exp_avg_sq, i) for i in range(len(self.params))]
        with torch.no_grad():
            for p, pv, gv in zip(self.params, self.param_views, self.grad_views):
                pv.copy_(p)
                if p.grad is not None:
                    gv.copy_(p.grad)
                p.data = pv
                p.grad = gv
        self.param_ptrs = [v.data_ptr() for v in self.param_views]

    def _view(self, buf, i):
        p = self.params[i]
        return buf.as_strided(p.shape, self.strides[i], self.offsets[i])

    def versions(self):
        """{storage offset: version counter} of the parameters (each has its own counter)."""
        return {off: p._version for off, p in zip(self.offsets, self.params)}

    def state_of(self, i):
        return {"step": self.step, "exp_avg": self.exp_avg_views[i],
                "exp_avg_sq": self.exp_avg_sq_views[i]}

    def check_params(self):
        for i, (p, ptr) in enumerate(zip(self.params, self.param_ptrs)):
            if p.data_ptr() != ptr:
                raise RuntimeError(
                    f"FusedAdam: parameter {i} of shape {tuple(p.shape)} no longer lives in the "
                    "optimizer's flat buffer (its storage was replaced, e.g. by `p.data = ...` or by "
                    "moving the module to another device after building the optimizer); build "
                    "FusedAdam after the model is on its device, and update parameters in place")

    def gather_grads(self):
        """Makes the flat grad buffer hold every parameter's current gradient (see module doc).
        Returns False when no parameter has a gradient (the group is then skipped)."""
        none, foreign = [], []
        for i, (p, gv) in enumerate(zip(self.params, self.grad_views)):
            g = p.grad
            if g is gv:
                continue
            if g is None:
                none.append(i)
            elif g.data_ptr() != gv.data_ptr() or g.stride() != gv.stride():
                foreign.append(i)
            else:  # the same storage in another Python object: still our view
                p.grad = gv
        if len(none) == len(self.params):
            self.zero_grads()
            return False
        for i in foreign:
            g = self.params[i].grad
            if g.is_sparse:
                raise RuntimeError("FusedAdam does not support sparse gradients")
            self.grad_views[i].copy_(g)
            self.params[i].grad = self.grad_views[i]
        for i in none:
            self.grad_views[i].zero_()
            self.params[i].grad = self.grad_views[i]
        return True

    def zero_grads(self):
        self.grad.zero_()
        for p, gv in zip(self.params, self.grad_views):
            if p.grad is not gv:
                p.grad = gv


class FusedAdam(torch.optim.Optimizer):
    """torch.optim.Adam (L2 weight decay) with every group's update fused into one op.

    Defaults are DCGAN's (lr 2e-4, betas (0.5, 0.999)). See the module docstring for how
    parameters and gradients are packed, zero_grad's behaviour and what is not supported."""

    def __init__(self, params, lr=2e-4, betas=(0.5, 0.999), eps=1e-8, weight_decay=0, *,
                 amsgrad=False, maximize=False):
        _check_hparams(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            amsgrad=amsgrad, maximize=maximize))
        self._flat = []  # one _FlatGroup per entry of self.param_groups, same order
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False)
        super().__init__(params, defaults)

    # -- groups and packing ------------------------------------------------------------------
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hparams(group)
            params = group["params"]
            if not params:
                raise ValueError("FusedAdam: a parameter group has no parameters")
            device = params[0].device
            for i, p in enumerate(params):
                if p.dtype != torch.float32:
                    raise TypeError(f"FusedAdam: parameter {i} is {p.dtype}; only float32 "
                                    "parameters are supported (keep fp32 master weights)")
                if p.device != device:
                    raise ValueError(f"FusedAdam: parameter {i} is on {p.device}, the group's "
                                     f"first on {device}; put each device in its own group")
                if not p.requires_grad:
                    raise ValueError(f"FusedAdam: parameter {i} does not require grad; leave "
                                     "frozen parameters out of the optimizer")
                if p.is_sparse or (p.grad is not None and p.grad.is_sparse):
                    raise ValueError("FusedAdam does not support sparse parameters or gradients")
            _ext.check_device(device)
            flat = _FlatGroup(params)
        except Exception:
            self.param_groups.pop()
            raise
        self._flat.append(flat)
        for i, p in enumerate(flat.params):
            self.state[p] = flat.state_of(i)

    def flat_buffers(self, group=0):
        """The flat tensors of a group: param, grad, exp_avg, exp_avg_sq, step (fp32, 0-d)."""
        f = self._flat[group]
        return {"param": f.param, "grad": f.grad, "exp_avg": f.exp_avg,
                "exp_avg_sq": f.exp_avg_sq, "step": f.step}

    def bf16_copies(self):
        """[(param, copy, versions)] per group: `copy` is a bf16 copy of the group's flat
        parameter buffer `param`, made on the first call (rewritten in place when stale) and
        from then on rewritten by every step() in its one launch; it holds the parameters'
        values while their version counters read `versions` ({storage offset in param:
        version}; any in-place change of a parameter moves its counter on). A bf16 training
        step reads its weights from it instead of casting them
        (fastdcgan.kernels.weights.provide_copy)."""
        for flat in self._flat:
            if flat.copy is None:   # never written: the refresh below fills it
                flat.copy = torch.empty_like(flat.param, dtype=torch.bfloat16)
        self.refresh_bf16_copies()
        return [(f.param, f.copy, f.copy_versions) for f in self._flat]

    def refresh_bf16_copies(self):
        """Rewrites, in place, the bf16 copies (made by bf16_copies) of groups whose parameters
        changed outside step(). A captured training step calls it before each replay: the graph
        reads the copies' memory, and the contract of a captured step is that parameters may be
        updated in place between replays."""
        for flat in self._flat:
            versions = flat.versions()
            if flat.copy is not None and flat.copy_versions != versions:
                flat.copy.copy_(flat.param)
                flat.copy_versions = versions

    # -- training ------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True):
        """Zeroes every flat gradient buffer in place; gradients stay views of it.

        `set_to_none` is accepted for API compatibility and ignored (see the module docstring)."""
        for flat in self._flat:
            flat.zero_grads()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        op = torch.ops.fastdcgan.adam_step
        for group, flat in zip(self.param_groups, self._flat):
            _check_hparams(group)
            flat.check_params()
            if not flat.gather_grads():
                continue
            beta1, beta2 = group["betas"]
            op(flat.param, flat.grad, flat.exp_avg, flat.exp_avg_sq, flat.step,
               float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
               float(group["weight_decay"]), flat.sync, flat.copy)
            # the op writes through raw pointers: bump the parameters' version counters as an
            # in-place update does, so autograd still catches a use of stale saved weights
            for p in flat.params:
                torch.autograd.graph.increment_version(p)
            if flat.copy is not None:
                flat.copy_versions = flat.versions()
        return loss

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        """torch.optim.Adam's format: per parameter {'step': 0-d float32 CPU tensor, 'exp_avg',
        'exp_avg_sq'} (views of the flat buffers, like torch.optim.Adam's own references)."""
        sd = super().state_dict()
        sd["state"] = {k: {**v, "step": v["step"].detach().to("cpu", copy=True)}
                       for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        """Loads a FusedAdam or torch.optim.Adam state_dict of the same parameters."""
        for g in state_dict["param_groups"]:
            _check_hparams(g)
        super().load_state_dict(state_dict)
        for group, flat in zip(self.param_groups, self._flat):
            if [id(p) for p in group["params"]] != [id(p) for p in flat.params]:
                raise RuntimeError("FusedAdam: parameter groups changed while loading state")
            self._adopt_loaded_state(flat)

    def _adopt_loaded_state(self, flat):
        loaded = [self.state.get(p) for p in flat.params]
        present = [s for s in loaded if s]
        steps = {float(s["step"]) for s in present}
        if len(steps) > 1:
            raise ValueError(
                f"FusedAdam: the loaded state has parameters at different step counts {sorted(steps)}; "
                "FusedAdam keeps one step count per parameter group")
        step = steps.pop() if steps else 0.0
        if present and len(present) != len(loaded) and step != 0.0:
            raise ValueError("FusedAdam: the loaded state covers only some parameters of a group "
                             f"(at step {step:g}); FusedAdam needs all of a group's parameters")
        with torch.no_grad():
            for i, s in enumerate(loaded):
                for key, views in (("exp_avg", flat.exp_avg_views), ("exp_avg_sq", flat.exp_avg_sq_views)):
                    if s:
                        if tuple(s[key].shape) != tuple(views[i].shape):
                            raise ValueError(f"FusedAdam: loaded {key} of parameter {i} has shape "
                                             f"{tuple(s[key].shape)}, expected {tuple(views[i].shape)}")
                        views[i].copy_(s[key])
                    else:
                        views[i].zero_()
            flat.step.fill_(step)
        for i, p in enumerate(flat.params):
            self.state[p] = flat.state_of(i)


def _check_hparams(group):
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= float(eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= float(beta1) < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= float(beta2) < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= float(wd):
        raise ValueError(f"Invalid weight_decay value: {wd}")
    for key, what in (("amsgrad", "amsgrad"), ("maximize", "maximize"),
                      ("decoupled_weight_decay", "decoupled weight decay (AdamW)")):
        if group.get(key, False):
            raise NotImplementedError(f"FusedAdam does not support {what}; use torch.optim.Adam")
