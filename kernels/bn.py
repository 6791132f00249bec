"""BatchNorm pieces shared by the fused conv blocks (training-mode BN split around the GEMMs).

Forward: the conv GEMM epilogue writes per-tile (count, mean, M2) partials of its output tile;
`bn_finalize` merges them (Chan's parallel-variance formula, deterministic, fp32), updates the
running stats like F.batch_norm (momentum, unbiased variance) and emits mean, rstd (saved for
backward) and scale = gamma*rstd, shift = beta - mean*scale (consumed by the next GEMM's
prologue, or by `bn_apply` where an op must return a materialized activation).

Backward (per channel, M = N*H*W, xhat = (y-mean)*rstd, dz = g*act'(z)):
    dbeta = sum(dz), dgamma = sum(dz*xhat)
    dy = A*dz + B*y + C,  A = gamma*rstd, B = -gamma*rstd^2*dgamma/M,
                           C = gamma*rstd*(rstd*mean*dgamma - dbeta)/M
The per-tile sums come from `bn_bwd_reduce` (or from a dgrad GEMM epilogue in the chained
network); `bn_bwd_finalize` reduces them and emits dgamma, dbeta, A, B, C, which the dgrad /
wgrad GEMM prologues apply as they load dy. In eval mode B = C = 0.

Batch groups (a pass over `groups` equal batches one after the other, e.g. D on cat(real, fake),
each normalized by its own statistics as in separate calls): every kernel here takes per-group
vectors [groups, C]; partial rows are ordered (group, tile), the finalizes handle the groups in
turn (running stats updated group by group), and the elementwise kernels' row tiles never
straddle two groups.

Sync BN (several processes, one global batch): both finalizes only merge partial rows, so
`set_partials_sync` installs a gather that concatenates the rows of every process before they run;
the result is the global batch's statistics exactly (see bn_bwd_finalize for its dgamma/dbeta).
"""
import triton
import triton.language as tl

from .activations import act_grad, apply_act
from .grid import cdiv, pow2_divisor
from .implicit_gemm import _load_operand
from .memory import new_empty
from .pdl import grid_dependency_wait, launch_options

# Finalize: a serial walk over the partial rows, so its time is the number of dependent steps,
# not bytes (H100, bf16 step at B=128: 2-4 programs of 32 channels took 7-24 us a launch, 125 us
# a step). Narrow channel blocks (8 channels: a 32-byte sector a row) give a 64-channel layer 8
# programs, and a tile of up to FIN_TILE elements walks the rows in few steps.
FIN_TILE = 8192


def _finalize_tiles(c, rows):
    """(BLOCK_C, BLOCK_T, num_warps) of a finalize over `rows` partial rows of c channels."""
    block_c = 8 if c <= 128 else (16 if c <= 256 else 32)
    block_t = min(FIN_TILE // block_c, max(16, triton.next_power_of_2(rows)))
    return block_c, block_t, 8 if block_c * block_t >= 4096 else 4


# Elementwise passes over an NHWC tensor viewed as [rows, C]: a 64-row x 64-channel tile keeps
# the channel vectors in registers and each row's channels contiguous (coalesced). The backward
# reduction walks RED_ROWS rows per program so that its partial buffer (and the finalize's
# serial walk over it) stays small.
EW_BLOCK_R, EW_BLOCK_C = 64, 64
RED_ROWS = 512

# Process-wide sync-BN hook (None: per-process statistics). See set_partials_sync.
_partials_sync = None


def set_partials_sync(sync):
    """Installs `sync`, or removes the hook with None. `sync.world_size` is the number of
    processes and `sync.gather(tensors)` returns each tensor's rows from every process,
    concatenated along dim 0 (every process calls it with the same shapes, i.e. the same
    per-process batch). Used by fastdcgan.distributed.use_sync_batchnorm."""
    global _partials_sync
    _partials_sync = sync


@triton.jit
def _partial_rows_of_group(t0, g, T, TG, G, BLOCK_T: tl.constexpr):
    # Partial rows t0 .. t0 + BLOCK_T of batch group g (and their mask) among T rows ordered
    # [process][group][TG rows]: group g's u-th row is (u // TG)*G*TG + g*TG + u % TG, u < T / G.
    u = t0 + tl.arange(0, BLOCK_T)
    return (u // TG) * (G * TG) + g * TG + u % TG, u < T // G


@triton.jit
def bn_finalize_kernel(mean_t_ptr, m2_t_ptr, cnt_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr,
                       mean_ptr, rstd_ptr, scale_ptr, shift_ptr, batches_ptr, T, TG, G, C, momentum,
                       eps, TRAINING: tl.constexpr, UPDATE: tl.constexpr, COUNT_BATCH: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    # Each program owns BLOCK_C channels and, for each of the G batch groups in turn, walks the
    # group's tile partials twice: the batch mean from sum(cnt*mean_t), then
    # M2 = sum(M2_t + cnt*(mean_t - mean)^2) (Chan), in a fixed order; the running stats take
    # the groups' statistics one after the other, as G separate BatchNorm calls would. Partial
    # rows are ordered [process][group][TG rows] (sync BN concatenates the processes' rows).
    # Vectors out: [G, C]. COUNT_BATCH: program 0 also adds G to num_batches_tracked.
    grid_dependency_wait(PDL)
    if COUNT_BATCH:
        if tl.program_id(0) == 0:
            tl.store(batches_ptr, tl.load(batches_ptr) + G)
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    gamma = tl.load(gamma_ptr + rc, mask=c_ok, other=1.0).to(tl.float32)
    beta = tl.load(beta_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    rm = tl.load(rm_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + rc, mask=c_ok, other=1.0).to(tl.float32)
    for g in range(G):
        if TRAINING:
            n = tl.zeros([BLOCK_C], tl.float32)
            s = tl.zeros([BLOCK_C], tl.float32)
            for t0 in range(0, T // G, BLOCK_T):
                rt, t_ok = _partial_rows_of_group(t0, g, T, TG, G, BLOCK_T)
                m = t_ok[:, None] & c_ok[None, :]
                cnt = tl.load(cnt_ptr + rt, mask=t_ok, other=0.0)
                mu = tl.load(mean_t_ptr + rt[:, None] * C + rc[None, :], mask=m, other=0.0)
                n += tl.sum(cnt, 0)
                s += tl.sum(cnt[:, None] * mu, 0)
            mean = s / n
            m2 = tl.zeros([BLOCK_C], tl.float32)
            for t0 in range(0, T // G, BLOCK_T):
                rt, t_ok = _partial_rows_of_group(t0, g, T, TG, G, BLOCK_T)
                m = t_ok[:, None] & c_ok[None, :]
                cnt = tl.load(cnt_ptr + rt, mask=t_ok, other=0.0)
                mu = tl.load(mean_t_ptr + rt[:, None] * C + rc[None, :], mask=m, other=0.0)
                q = tl.load(m2_t_ptr + rt[:, None] * C + rc[None, :], mask=m, other=0.0)
                d = mu - mean[None, :]
                m2 += tl.sum(q + cnt[:, None] * d * d, 0)
            var = m2 / n
            if UPDATE:
                rm = (1.0 - momentum) * rm + momentum * mean
                rv = (1.0 - momentum) * rv + momentum * (m2 / (n - 1.0))
        else:
            mean = rm
            var = rv
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        scale = gamma * rstd
        tl.store(mean_ptr + g * C + rc, mean, mask=c_ok)
        tl.store(rstd_ptr + g * C + rc, rstd, mask=c_ok)
        tl.store(scale_ptr + g * C + rc, scale, mask=c_ok)
        tl.store(shift_ptr + g * C + rc, beta - mean * scale, mask=c_ok)
    if UPDATE:
        tl.store(rm_ptr + rc, rm.to(rm_ptr.dtype.element_ty), mask=c_ok)
        tl.store(rv_ptr + rc, rv.to(rv_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def bn_apply_kernel(y_ptr, a_ptr, scale_ptr, shift_ptr, R, C, GROUP_ROWS, slope,
                    ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    PDL: tl.constexpr):
    # a = act(y*scale + shift) on a [BLOCK_R, BLOCK_C] tile of the NHWC tensor seen as [R, C];
    # the tile's rows lie in one batch group of GROUP_ROWS rows, whose vectors it reads.
    grid_dependency_wait(PDL)
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rr < R)[:, None] & (rc < C)[None, :]
    offs = rr[:, None] * C + rc[None, :]
    gofs = (tl.program_id(0) * BLOCK_R) // GROUP_ROWS * C
    y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + gofs + rc, mask=rc < C, other=0.0)
    b = tl.load(shift_ptr + gofs + rc, mask=rc < C, other=0.0)
    a = apply_act(y * s[None, :] + b[None, :], ACT, slope)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=m)


@triton.jit
def bn_bwd_reduce_kernel(g_ptr, y_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, s0_ptr, s1_ptr,
                         R, C, GROUP_ROWS, slope, ACT: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    # Each program: ROWS rows (of one batch group of GROUP_ROWS rows) x BLOCK_C channels, walked
    # BLOCK_R rows at a time; dz = g*act'(z) with z = y*scale + shift recomputed from the saved
    # conv output; the column sums of dz and dz*xhat go to row pid_r of the partials (so the
    # rows come out group by group, as bn_bwd_finalize reads them).
    grid_dependency_wait(PDL)
    pid_r = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    gofs = (pid_r * ROWS) // GROUP_ROWS * C
    s = tl.load(scale_ptr + gofs + rc, mask=c_ok, other=0.0)[None, :]
    b = tl.load(shift_ptr + gofs + rc, mask=c_ok, other=0.0)[None, :]
    mu = tl.load(mean_ptr + gofs + rc, mask=c_ok, other=0.0)[None, :]
    r = tl.load(rstd_ptr + gofs + rc, mask=c_ok, other=0.0)[None, :]
    s0 = tl.zeros([BLOCK_C], tl.float32)
    s1 = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(pid_r * ROWS, pid_r * ROWS + ROWS, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        m = (rr < R)[:, None] & c_ok[None, :]
        offs = rr[:, None] * C + rc[None, :]
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dz = tl.where(m, g * act_grad(y * s + b, ACT, slope), 0.0)
        s0 += tl.sum(dz, 0)
        s1 += tl.sum(dz * (y - mu) * r, 0)
    tl.store(s0_ptr + pid_r * C + rc, s0, mask=c_ok)
    tl.store(s1_ptr + pid_r * C + rc, s1, mask=c_ok)


@triton.jit
def bn_bwd_apply_kernel(g_ptr, y_ptr, dy_ptr, s_ptr, b_ptr, ca_ptr, cb_ptr, cc_ptr, R, C,
                        GROUP_ROWS, slope, AFFINE: tl.constexpr, ACT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    # dy = A*g*act'(y*scale + shift) + B*y + C (AFFINE) or g*act'(y) on a [BLOCK_R, BLOCK_C] tile
    # (of one batch group): the GEMMs' BN-backward prologue (MODE 2) written out once, for GEMMs
    # that read it raw.
    grid_dependency_wait(PDL)
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rr < R)[:, None] & (rc < C)[None, :]
    offs = rr[:, None] * C + rc[None, :]
    gofs = (tl.program_id(0) * BLOCK_R) // GROUP_ROWS * C
    dy = _load_operand(y_ptr, g_ptr, offs, m, rc, C, s_ptr + gofs, b_ptr + gofs, ca_ptr + gofs,
                       cb_ptr + gofs, cc_ptr + gofs, slope, 2, AFFINE, ACT)
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=m)


@triton.jit
def bn_bwd_finalize_kernel(s0_ptr, s1_ptr, T, TG, G, C, count, grad_scale, gamma_ptr, mean_ptr,
                           rstd_ptr, dgamma_ptr, dbeta_ptr, ca_ptr, cb_ptr, cc_ptr,
                           TRAINING: tl.constexpr, ACCUMULATE: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    # Each program reduces, per batch group, the group's partial rows of BLOCK_C channels (rows
    # ordered as in bn_finalize_kernel; fixed order: deterministic), emits the group's [G, C]
    # coefficients of dy = A*dz + B*y + C (count: rows per group), and grad_scale*dgamma,
    # grad_scale*dbeta summed over the groups (added to the buffers with ACCUMULATE).
    grid_dependency_wait(PDL)
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    gamma = tl.load(gamma_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    dbeta_all = tl.zeros([BLOCK_C], tl.float32)
    dgamma_all = tl.zeros([BLOCK_C], tl.float32)
    for g in range(G):
        dbeta = tl.zeros([BLOCK_C], tl.float32)
        dgamma = tl.zeros([BLOCK_C], tl.float32)
        for t0 in range(0, T // G, BLOCK_T):
            rt, t_ok = _partial_rows_of_group(t0, g, T, TG, G, BLOCK_T)
            m = t_ok[:, None] & c_ok[None, :]
            dbeta += tl.sum(tl.load(s0_ptr + rt[:, None] * C + rc[None, :], mask=m, other=0.0), 0)
            dgamma += tl.sum(tl.load(s1_ptr + rt[:, None] * C + rc[None, :], mask=m, other=0.0), 0)
        rstd = tl.load(rstd_ptr + g * C + rc, mask=c_ok, other=0.0)
        a = gamma * rstd
        if TRAINING:
            mean = tl.load(mean_ptr + g * C + rc, mask=c_ok, other=0.0)
            b = -a * rstd * dgamma / count
            c = a * (rstd * mean * dgamma - dbeta) / count
        else:
            b = tl.zeros([BLOCK_C], tl.float32)
            c = tl.zeros([BLOCK_C], tl.float32)
        tl.store(ca_ptr + g * C + rc, a, mask=c_ok)
        tl.store(cb_ptr + g * C + rc, b, mask=c_ok)
        tl.store(cc_ptr + g * C + rc, c, mask=c_ok)
        dbeta_all += dbeta
        dgamma_all += dgamma
    dgamma_out = dgamma_all * grad_scale
    dbeta_out = dbeta_all * grad_scale
    if ACCUMULATE:
        dgamma_out += tl.load(dgamma_ptr + rc, mask=c_ok, other=0.0)
        dbeta_out += tl.load(dbeta_ptr + rc, mask=c_ok, other=0.0)
    tl.store(dgamma_ptr + rc, dgamma_out, mask=c_ok)
    tl.store(dbeta_ptr + rc, dbeta_out, mask=c_ok)


def bn_finalize(partials, gamma, beta, running_mean, running_var, *, training, momentum, eps,
                batches_tracked=None, groups=1):
    """partials = (mean_t [T, C], m2_t [T, C], cnt [T]) or None in eval mode; with `groups` batch
    groups (each normalized by its own statistics) the rows come group by group.
    Returns fp32 (mean, rstd, scale, shift), each [groups * C] (group-major); updates the running
    stats in place when training (group by group), and adds `groups` to the int64 counter
    `batches_tracked` when given."""
    c, dev = gamma.numel(), gamma.device
    mean, rstd, scale, shift = (new_empty((groups * c,), dev) for _ in range(4))
    update = training and running_mean is not None
    if training:
        t_local = partials[2].numel()
        if _partials_sync is not None:
            partials = _partials_sync.gather(partials)
        mean_t, m2_t, cnt = partials
        t = cnt.numel()
    else:
        mean_t = m2_t = cnt = mean
        t = t_local = groups
    rm = running_mean if running_mean is not None else mean
    rv = running_var if running_var is not None else mean
    block_c, block_t, warps = _finalize_tiles(c, t // groups)
    bn_finalize_kernel[(cdiv(c, block_c),)](
        mean_t, m2_t, cnt, gamma, beta, rm, rv, mean, rstd, scale, shift,
        batches_tracked if batches_tracked is not None else mean, t, t_local // groups, groups, c,
        float(momentum), float(eps), TRAINING=training, UPDATE=update,
        COUNT_BATCH=batches_tracked is not None, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=warps, **launch_options(dev))
    return mean, rstd, scale, shift


def _group_rows(t, groups, limit):
    """(rows [R, C] of the NHWC tensor t, rows per batch group, row tile <= limit within a group)."""
    r = t.numel() // t.shape[-1]
    return r, r // groups, limit if groups == 1 else pow2_divisor(r // groups, limit)


def bn_apply(y, scale, shift, act, slope, out_dtype, groups=1):
    """act(y*scale + shift) over an NHWC tensor, written as a new NHWC tensor; scale and shift
    [groups * C]: one vector per batch group."""
    c = y.shape[-1]
    r, group_rows, block_r = _group_rows(y, groups, EW_BLOCK_R)
    a = new_empty(y.shape, y.device, out_dtype)
    grid = (cdiv(r, block_r), cdiv(c, EW_BLOCK_C))
    bn_apply_kernel[grid](y, a, scale, shift, r, c, group_rows, float(slope), ACT=act,
                          BLOCK_R=block_r, BLOCK_C=EW_BLOCK_C, **launch_options(y.device))
    return a


def bn_bwd_reduce(g, y, scale, shift, mean, rstd, act, slope, groups=1):
    """Per-tile partial sums (dz, dz*xhat) of an NHWC gradient g against the saved output y, the
    vectors [groups * C]; partial rows come group by group."""
    c = y.shape[-1]
    r, group_rows, rows = _group_rows(y, groups, RED_ROWS)
    t = cdiv(r, rows)
    s0 = new_empty((t, c), y.device)
    s1 = new_empty((t, c), y.device)
    bn_bwd_reduce_kernel[(t, cdiv(c, EW_BLOCK_C))](
        g, y, scale, shift, mean, rstd, s0, s1, r, c, group_rows, float(slope), ACT=act, ROWS=rows,
        BLOCK_R=min(EW_BLOCK_R, rows), BLOCK_C=EW_BLOCK_C, **launch_options(y.device))
    return s0, s1


def bn_bwd_apply(bwd, groups=1):
    """The data-gradient operand of a BwdOperand (vectors [groups * C]), materialized: dy (NHWC,
    y's dtype)."""
    y = bwd.y
    c = y.shape[-1]
    r, group_rows, block_r = _group_rows(y, groups, EW_BLOCK_R)
    dy = new_empty(y.shape, y.device, y.dtype)
    aff = bwd.scale is not None
    vec = (bwd.scale, bwd.shift, bwd.ca, bwd.cb, bwd.cc) if aff else (y,) * 5
    grid = (cdiv(r, block_r), cdiv(c, EW_BLOCK_C))
    bn_bwd_apply_kernel[grid](bwd.g, y, dy, *vec, r, c, group_rows, float(bwd.slope), AFFINE=aff,
                              ACT=bwd.act, BLOCK_R=block_r, BLOCK_C=EW_BLOCK_C,
                              **launch_options(y.device))
    return dy


def bn_bwd_finalize(partials, gamma, mean, rstd, count, *, training, grads=None, groups=1):
    """Returns (dgamma, dbeta [C], A, B, C [groups * C]), fp32; `count` is this process's N*H*W
    (all groups), mean/rstd [groups * C], partial rows group by group. grads: fp32 (gamma.grad,
    beta.grad) to add dgamma, dbeta to (they are then returned as None).

    With sync BN (training), A, B, C come from the global sums and count, and dgamma, dbeta are
    this process's share of the global sums (divided by the world size): the data-parallel
    gradient average over processes then gives the global batch's gradient."""
    synced = training and _partials_sync is not None
    grad_scale = 1.0
    t_local = partials[0].shape[0]
    if synced:
        partials = _partials_sync.gather(partials)
        count *= _partials_sync.world_size
        grad_scale = 1.0 / _partials_sync.world_size
    s0, s1 = partials
    c, dev = gamma.numel(), gamma.device
    dgamma, dbeta = grads if grads is not None else (new_empty((c,), dev), new_empty((c,), dev))
    coeffs = [new_empty((groups * c,), dev) for _ in range(3)]
    block_c, block_t, warps = _finalize_tiles(c, s0.shape[0] // groups)
    bn_bwd_finalize_kernel[(cdiv(c, block_c),)](
        s0, s1, s0.shape[0], t_local // groups, groups, c, float(count // groups), grad_scale,
        gamma, mean, rstd, dgamma, dbeta, *coeffs, TRAINING=training,
        ACCUMULATE=grads is not None, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps,
        **launch_options(dev))
    if grads is not None:
        dgamma = dbeta = None
    return (dgamma, dbeta, *coeffs)
