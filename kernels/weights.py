"""Conv weights in the layout the GEMM kernels read, and the training step's weight scope.

Kernel layout: W[kh, kw, c_in, c_out] contiguous, c_in / c_out being the conv's input / output
channels (for Conv2d and ConvTranspose2d alike). A PyTorch weight is (c_out, c_in, kh, kw) for
Conv2d and (c_in, c_out, kh, kw) for ConvTranspose2d; stored with kernel-layout strides
(`use_kernel_layout`, which the models do) it is a permuted view that the kernels read in place:
no packing copy per use, none per direction (the data gradient reads it transposed), and the
weight gradient is produced in the same layout, i.e. straight in the parameter's own layout. A
weight in any other layout (a user's tensor given to fastdcgan.ops) costs one copy per call.

`training_step()` is the scope of one training step (fastdcgan.step.GanStep):
  * reduced-precision copies of the weights (bf16 under autocast) are made once and reused by
    every pass of the step until the weights change (a new version counter, or
    `weights_updated()`, which GanStep calls after each optimizer step); weights sharing one
    storage (FusedAdam's flat buffer) are cast together in one launch, or not at all where
    `provide_copy` handed over a current copy of that storage (FusedAdam writes one in its
    update launch);
  * the kernels accumulate weight and BN-parameter gradients straight into the parameters'
    existing fp32 `.grad` tensors (gradient-accumulation fusion, as in Megatron-LM) and autograd
    receives None for them: no zero-filled gradient buffer, no AccumulateGrad addition. This is
    for code that runs .backward() and reads .grad; torch.autograd.grad inside the scope would
    not see those gradients.
Nothing cached outlives the scope: a CUDA-graph replay changes weights without Python noticing.
"""
import contextlib

import torch

# permutations PyTorch layout -> kernel layout (kh, kw, c_in, c_out), and back
_TO_KERNEL = {False: (2, 3, 1, 0), True: (2, 3, 0, 1)}
_TO_TORCH = {False: (3, 2, 0, 1), True: (2, 3, 0, 1)}


def kernel_view(w, transposed):
    """w (PyTorch layout) seen as (kh, kw, c_in, c_out): a view, contiguous iff w is stored in
    kernel layout."""
    return w.permute(*_TO_KERNEL[transposed])


def torch_view(wk, transposed):
    """Inverse of kernel_view: a (kh, kw, c_in, c_out) tensor seen in PyTorch's weight layout."""
    return wk.permute(*_TO_TORCH[transposed])


def use_kernel_layout(module):
    """Re-stores the weight of every kernel-4 Conv2d / ConvTranspose2d in `module` in kernel
    layout (same shape and values, other strides). Call it before building an optimizer (which
    keeps the strides); state_dicts and load_state_dict are unaffected."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and m.kernel_size == (4, 4):
            transposed = isinstance(m, torch.nn.ConvTranspose2d)
            with torch.no_grad():
                m.weight.data = torch_view(kernel_view(m.weight, transposed).contiguous(), transposed)
    return module


class _StepScope:
    def __init__(self):
        self.casts = {}
        self.copies = []   # (source, copy, versions) from provide_copy


_scope = None


@contextlib.contextmanager
def training_step():
    """The scope of one training step (see the module docstring)."""
    global _scope
    outer, _scope = _scope, _StepScope()
    try:
        yield
    finally:
        _scope = outer


def weights_updated():
    """Drops the step's weight casts and copies: call after an optimizer step inside
    training_step()."""
    if _scope is not None:
        _scope.casts.clear()
        _scope.copies.clear()


def provide_copy(source, copy, versions):
    """Inside training_step(): `copy` (contiguous, source's size) holds the values of the
    contiguous tensor `source` in copy.dtype, for the tensors lying in source at the storage
    offsets of `versions` ({offset: version counter}) as long as their version counters read
    so. kernel_weights then returns views of `copy` for such weights instead of casting them.
    Outside the scope: nothing."""
    if _scope is not None:
        _scope.copies.append((source, copy, versions))


def _provided(views, lo, hi, dtype):
    """Views of a provided copy for `views` (contiguous, sharing one storage, covering storage
    elements lo..hi), or None."""
    storage = views[0].untyped_storage().data_ptr()
    for src, copy, versions in _scope.copies if _scope is not None else ():
        start = src.storage_offset()
        if (copy.dtype == dtype and src.untyped_storage().data_ptr() == storage
                and start <= lo and hi <= start + src.numel()
                and all(versions.get(v.storage_offset()) == v._version for v in views)):
            return [copy.as_strided(v.shape, v.stride(), copy.storage_offset() + v.storage_offset()
                                    - start) for v in views]
    return None


def _step_cached(key, make):
    """make(), or inside training_step() the tensor it made earlier in the step under `key`."""
    casts = _scope.casts if _scope is not None else None
    t = casts.get(key) if casts is not None else None
    if t is None:
        t = make()
        if casts is not None:
            casts[key] = t
    return t


def _tensor_key(v):
    """What identifies v's values within a step: its memory, view, dtype and version."""
    return (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()),
            v.dtype, v._version)


def kernel_weights(weights, transposed, dtype):
    """The kernel-layout tensors (kh, kw, c_in, c_out) in `dtype` of conv weights `weights`
    (PyTorch layout; transposed[i]: weights[i] is a ConvTranspose2d weight). Weights already in
    kernel layout and dtype are returned as views; inside training_step() casts are cached, and
    weights that share a storage are cast in one launch."""
    views = [kernel_view(w.detach(), t) for w, t in zip(weights, transposed)]
    if all(v.is_contiguous() and v.dtype == dtype for v in views):
        return views
    storage = views[0].untyped_storage().data_ptr()
    shared = (len(views) > 1 and all(v.is_contiguous() for v in views)
              and all(v.untyped_storage().data_ptr() == storage and v.dtype == views[0].dtype
                      for v in views))
    if shared:
        lo = min(v.storage_offset() for v in views)
        hi = max(v.storage_offset() + v.numel() for v in views)
        provided = _provided(views, lo, hi, dtype)
        if provided is not None:
            return provided
        key = (storage, lo, hi, dtype, tuple(v._version for v in views))
        flat = _step_cached(key, lambda: views[0].as_strided((hi - lo,), (1,), lo).to(dtype))
        return [flat.as_strided(v.shape, v.stride(), v.storage_offset() - lo) for v in views]
    def cast(v):
        if v.is_contiguous():
            return v.to(dtype)
        return torch.empty(v.shape, dtype=dtype, device=v.device).copy_(v)

    return [_step_cached(("cast", dtype) + _tensor_key(v), lambda v=v: cast(v)) for v in views]


def k_major(wk):
    """The kernel-layout weight wk [kh, kw, c_in, c_out] as a contiguous [kh, kw, c_out, c_in]
    tensor (c_in, a forward GEMM's K, innermost), the layout the data gradient reads W in. Inside
    training_step() the copy is cached until the weights change."""
    return _step_cached(("k_major",) + _tensor_key(wk), lambda: wk.transpose(2, 3).contiguous())


def grad_sink(p, kernel_layout_of=None):
    """Inside training_step(): the tensor the kernels should accumulate p's gradient into, i.e.
    p.grad (for a conv weight, `kernel_layout_of` = transposed, seen in kernel layout) when it is
    an fp32 tensor of that layout on p's device; else None (the gradient is returned to
    autograd)."""
    if _scope is None or p is None or not p.requires_grad:
        return None
    g = p.grad
    if g is None or g.dtype != torch.float32 or g.device != p.device:
        return None
    if kernel_layout_of is not None:
        g = kernel_view(g, kernel_layout_of)
    return g if g.is_contiguous() else None
