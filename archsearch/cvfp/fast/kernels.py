"""Triton kernels for the GPU hot spots of training and evaluation (imported only where Triton is available).

1. ``ce_rows``: cross-entropy of a (n, V) logits block against targets, fused with its
   gradient. The tied head is frozen, so the only gradient phase 2 needs from the head is the
   one w.r.t. its input: softmax(logits) - onehot, written over the logits in place. One pass
   finds max / sum-exp / argmax online, a second writes the gradient: the logits are read
   twice and written once, with no fp32 copy of the (n, 50257) matrix.

The recurrent validation pass's kernels are in recurrent_kernels.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from archsearch.cvfp.fast.device import sm_count


@triton.jit
def _ce_rows_kernel(
    logits_ptr, stride_row, targets_ptr, loss_ptr, argmax_ptr, grad_scale, scale_ptr, V: tl.constexpr, VP: tl.constexpr,
    BLOCK_V: tl.constexpr, GROUP: tl.constexpr, WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr, ARGMAX: tl.constexpr,
):  # fmt: skip
    """One program per row. First pass: the row's max, sum of exp and argmax, kept per group of
    GROUP adjacent columns (a group lies in one thread: its max is taken without crossing
    threads, and the running sum is rescaled once per group, not once per element, so the
    pass needs one exp per element). Second pass (WRITE_GRAD): softmax - onehot, scaled, over
    the logits in place."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    R: tl.constexpr = BLOCK_V // GROUP
    lane = tl.arange(0, R)
    offs = lane[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # (R, GROUP), row-major: contiguous
    m = tl.full([R], float("-inf"), tl.float32)  # running max per group lane
    s = tl.zeros([R], tl.float32)  # running sum of exp(x - m) per group lane
    best_i = tl.zeros([R], tl.int32)
    for start in tl.range(0, VP, BLOCK_V):
        idx = start + offs
        # masked at the padded width VP (a multiple of 8): a mask at V = 50,257 would make
        # every load scalar; the padding columns are then set aside here
        x = tl.load(base + idx, mask=idx < VP, other=0.0).to(tl.float32)
        x = tl.where(idx < V, x, float("-inf"))
        bm = tl.max(x, axis=1)  # (R,)
        if ARGMAX:
            # first index of the group's max; a later group replaces it only when strictly larger
            bi = tl.min(tl.where(x == bm[:, None], idx, VP), axis=1)
            best_i = tl.where(bm > m, bi, best_i)
        new_m = tl.maximum(m, bm)
        empty = new_m == float("-inf")  # a lane that has seen only padding so far
        safe_m = tl.where(empty, 0.0, new_m)
        s = s * tl.exp(m - safe_m) + tl.sum(tl.exp(x - safe_m[:, None]), axis=1)
        m = new_m
    row_max = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - row_max), axis=0)
    lse = row_max + tl.log(total)
    if ARGMAX:
        # first index holding the row max (argmax ties resolve to the lowest index, like torch)
        cand = tl.where(m == row_max, best_i, V)
        tl.store(argmax_ptr + row, tl.min(cand, axis=0))
    target = tl.load(targets_ptr + row)
    x_t = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, lse - x_t)
    if WRITE_GRAD:
        if ROW_SCALE:
            grad_scale = tl.load(scale_ptr + row)
        flat = tl.arange(0, BLOCK_V)
        for start in tl.range(0, VP, BLOCK_V):
            idx = start + flat
            x = tl.load(base + idx, mask=idx < VP, other=0.0).to(tl.float32)
            g = tl.where(idx < V, tl.exp(x - lse), 0.0) - tl.where(idx == target, 1.0, 0.0)
            tl.store(base + idx, (g * grad_scale).to(logits_ptr.dtype.element_ty), mask=idx < VP)


# (columns a block, group, warps), measured on an H200 (benchmarks/h200_ce_group_sweep.json,
# 4,096 rows of 50,257): with the gradient 0.314 ms, without 0.147 ms (the kernel of one exp
# pair per element that this replaced: 0.408 / 0.234 ms; a copy of the logits: 0.197 ms)
CE_TUNING = {True: (2048, 4, 4), False: (2048, 8, 4)}


def ce_rows(logits, targets, loss, argmax, grad_scale: float = 1.0, write_grad: bool = True, vocab_size: int | None = None,
            row_scale=None, block_v: int | None = None, group: int | None = None, warps: int | None = None) -> None:  # fmt: skip
    """Per-row CE into ``loss`` (fp32), argmax into ``argmax`` (int32; None: not computed); with
    ``write_grad`` the logits become grad_scale * (softmax - onehot), or row_scale[i] * (...)
    for row i where ``row_scale`` (n,) fp32 is given. ``logits`` (n, >= V), rows contiguous;
    columns from ``vocab_size`` on are padding: they take no part in the loss, and with
    ``write_grad`` they are set to 0. ``block_v``/``group``/``warps``: tuning (tests, sweeps)."""
    n, VP = logits.shape
    V = vocab_size or VP
    assert logits.stride(1) == 1 and V <= VP
    assert row_scale is None or (row_scale.shape == (n,) and row_scale.dtype.is_floating_point)
    bv, gr, w = CE_TUNING[write_grad]
    _ce_rows_kernel[(n,)](logits, logits.stride(0), targets, loss, loss if argmax is None else argmax, grad_scale,
                          loss if row_scale is None else row_scale, V, VP, BLOCK_V=block_v or bv, GROUP=group or gr,
                          WRITE_GRAD=write_grad, ROW_SCALE=row_scale is not None, ARGMAX=argmax is not None,
                          num_warps=warps or w)  # fmt: skip


# the row count varies from batch to batch: one compiled kernel for all of them. Phase 1's z stride
# is not specialised either, as before the two forward kernels were merged: specialised, its loads
# compile to other code (wider vectors), which may change the sums' order and so the bits
@triton.jit(do_not_specialize=["n", "stride_z"])
def _res_relu_ln_fwd_kernel(
    z_ptr, stride_z, zb_ptr, r_ptr, g_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, y16_ptr, stride16, n, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, HAS_ZB: tl.constexpr, HAS_Y16: tl.constexpr,
    DENSE_Z: tl.constexpr, DENSE_Y16: tl.constexpr,
):  # fmt: skip
    """y = LayerNorm(r + ReLU(z + zb)) for ROWS rows, in fp32 whatever z and r are stored in
    (zb: the Linear's bias, added here rather than in its GEMM); with HAS_Y16 also y in
    y16's dtype. r and y are (n, D) contiguous; z's rows are ``stride_z`` apart and y16's
    ``stride16`` apart, or, with DENSE_Z / DENSE_Y16, D apart, a stride known when compiling
    (the layers' z, phase 1's y16; the other two are column slices of wider buffers)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    rmask = rows < n
    mask = rmask[:, None] & cmask[None, :]
    if DENSE_Z:
        z_at = z_ptr + (rows64[:, None] * D + cols[None, :])
    else:
        z_at = z_ptr + rows64[:, None] * stride_z + cols[None, :]
    z = tl.load(z_at, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZB:
        z += tl.load(zb_ptr + cols, mask=cmask, other=0.0)[None, :]
    ofs = rows64[:, None] * D + cols[None, :]
    x = tl.load(r_ptr + ofs, mask=mask, other=0.0).to(tl.float32) + tl.maximum(z, 0.0)
    mean = tl.sum(x, axis=1) / D
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=1) / D + eps)
    gamma = tl.load(g_ptr + cols, mask=cmask, other=0.0)
    beta = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    y = d * rstd[:, None] * gamma[None, :] + beta[None, :]
    tl.store(y_ptr + ofs, y, mask=mask)
    if HAS_Y16:
        ofs16 = ofs if DENSE_Y16 else rows64[:, None] * stride16 + cols[None, :]
        tl.store(y16_ptr + ofs16, y.to(y16_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit(do_not_specialize=["n", "blocks_per_prog"])
def _res_relu_ln_bwd_kernel(
    dy_ptr, z_ptr, zb_ptr, r_ptr, g_ptr, mean_ptr, rstd_ptr, dz_ptr, dr_ptr, part_ptr, n, blocks_per_prog,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, WRITE_DR: tl.constexpr, HAS_ZB: tl.constexpr,
):  # fmt: skip
    """Gradients of y = LayerNorm(r + ReLU(z + zb)): dz and dr per row, and this program's
    partial sums over its rows of d gamma, d beta and d zb (= dz), as one row of 3*D in
    ``part`` (summed over programs by the caller, one reduction for all three)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gamma = tl.load(g_ptr + cols, mask=cmask, other=0.0)
    if HAS_ZB:
        zb = tl.load(zb_ptr + cols, mask=cmask, other=0.0)
    acc_g = tl.zeros([BLOCK_D], tl.float32)
    acc_b = tl.zeros([BLOCK_D], tl.float32)
    acc_z = tl.zeros([BLOCK_D], tl.float32)
    for i in range(blocks_per_prog):
        rows = (pid * blocks_per_prog + i) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n
        mask = rmask[:, None] & cmask[None, :]
        ofs = rows[:, None].to(tl.int64) * D + cols[None, :]
        dy = tl.load(dy_ptr + ofs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + ofs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZB:
            z += zb[None, :]
        x = tl.load(r_ptr + ofs, mask=mask, other=0.0).to(tl.float32) + tl.maximum(z, 0.0)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        acc_g += tl.sum(dy * xhat, axis=0)
        acc_b += tl.sum(dy, axis=0)
        wdy = dy * gamma[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if WRITE_DR:
            tl.store(dr_ptr + ofs, dx.to(dr_ptr.dtype.element_ty), mask=mask)
        dz = tl.where(mask & (z > 0.0), dx, 0.0)
        acc_z += tl.sum(dz, axis=0)
        tl.store(dz_ptr + ofs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid * 3 * D + cols, acc_g, mask=cmask)
    tl.store(part_ptr + pid * 3 * D + D + cols, acc_b, mask=cmask)
    tl.store(part_ptr + pid * 3 * D + 2 * D + cols, acc_z, mask=cmask)


def _ln_shape(D: int) -> tuple[int, int, int]:
    block = triton.next_power_of_2(D)
    rows = max(1, min(16, 4096 // block))  # about 4k elements per program
    return block, rows, 4 if block * rows <= 4096 else 8


def ln_fwd_into(z, zb, r, gamma, beta, eps: float, y, y16, mean, rstd, dense_z: bool, dense_y16: bool) -> None:
    """The forward kernel's launch, for res_relu_ln_fwd and phase1_kernels.ln_fwd: y (and y16
    where given) <- LN(r + ReLU(z + zb)) over the rows of (n, D) z; ``dense_z`` / ``dense_y16``:
    that tensor's rows are D apart (the stride compiled in) rather than its stride(0) apart."""
    n, D = z.shape
    assert z.stride(1) == 1 and r.is_contiguous() and y.is_contiguous() and (not dense_z or z.is_contiguous())
    assert y16 is None or (y16.shape == (n, D) and y16.stride(1) == 1 and (not dense_y16 or y16.is_contiguous()))
    block, rows, warps = _ln_shape(D)
    _res_relu_ln_fwd_kernel[(triton.cdiv(n, rows),)](z, z.stride(0), gamma if zb is None else zb, r, gamma, beta, y, mean,
                                                     rstd, y if y16 is None else y16, D if y16 is None else y16.stride(0),
                                                     n, eps, D=D, BLOCK_D=block, ROWS=rows, HAS_ZB=zb is not None,
                                                     HAS_Y16=y16 is not None, DENSE_Z=dense_z, DENSE_Y16=dense_y16,
                                                     num_warps=warps)  # fmt: skip


def res_relu_ln_fwd(z, r, gamma, beta, eps: float, zb=None, y16=None):
    """(y fp32, mean, rstd) of y = LayerNorm(r + ReLU(z + zb)) over the last axis of (n, D) z, r
    (contiguous; zb: an optional (D,) bias of z); ``y16``: an optional (n, D) view with unit
    column stride (any row stride) that receives y in its own dtype too."""
    import torch

    n, D = z.shape
    y = torch.empty(n, D, device=z.device, dtype=torch.float32)
    mean = torch.empty(n, device=z.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    ln_fwd_into(z, zb, r, gamma, beta, eps, y, y16, mean, rstd, dense_z=True, dense_y16=False)
    return y, mean, rstd


def res_relu_ln_bwd(dy, z, r, gamma, mean, rstd, need_dr: bool = True, zb=None):
    """(dz in z's dtype, dr in r's dtype or None, d gamma, d beta, d zb or None) for
    res_relu_ln_fwd."""
    import torch

    n, D = z.shape
    block, rows, warps = _ln_shape(D)
    nblocks = triton.cdiv(n, rows)
    progs = min(nblocks, 4 * sm_count(z.device))
    per = triton.cdiv(nblocks, progs)
    progs = triton.cdiv(nblocks, per)
    dz = torch.empty_like(z)
    dr = torch.empty_like(r) if need_dr else dz
    part = torch.empty(progs, 3 * D, device=z.device, dtype=torch.float32)
    _res_relu_ln_bwd_kernel[(progs,)](dy, z, gamma if zb is None else zb, r, gamma, mean, rstd, dz, dr, part, n, per,
                                      D=D, BLOCK_D=block, ROWS=rows, WRITE_DR=need_dr, HAS_ZB=zb is not None,
                                      num_warps=warps)  # fmt: skip
    dg, db, dzb = col_sum(part).view(3, D)
    return dz, (dr if need_dr else None), dg, db, (dzb if zb is not None else None)


@triton.jit(do_not_specialize=["P"])
def _col_sum_kernel(x_ptr, out_ptr, P, W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr):
    """out[j] = sum over the P rows of x[:, j] (with ACC: out[j] += it), for BLOCK_W columns per
    program, in a fixed order."""
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    cmask = cols < W
    acc = tl.zeros([BLOCK_P, BLOCK_W], tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        acc += tl.load(x_ptr + rows[:, None] * W + cols[None, :], mask=(rows < P)[:, None] & cmask[None, :], other=0.0)
    if ACC:
        tl.store(out_ptr + cols, tl.load(out_ptr + cols, mask=cmask, other=0.0) + tl.sum(acc, axis=0), mask=cmask)
    else:
        tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=cmask)


def col_sum(x, out=None, accumulate: bool = False):
    """``x.sum(0)`` of a contiguous fp32 (P, W) matrix of partial sums, deterministic, into a new
    tensor or into ``out`` (contiguous (W,) fp32); with ``accumulate``, ``out += x.sum(0)``. For
    the norm backward's 528 x 2304 partials on an H200, replayed from a CUDA graph: 8.0 us per
    call against 9.4 us for torch's reduction over the leading axis (9151006:benchmarks/h200_v7_profile.json)."""
    import torch

    P, W = x.shape
    assert x.is_contiguous() and (out is not None or not accumulate)
    if out is None:
        out = torch.empty(W, device=x.device, dtype=torch.float32)
    assert out.shape == (W,) and out.is_contiguous()
    _col_sum_kernel[(triton.cdiv(W, 64),)](x, out, P, W=W, BLOCK_P=32, BLOCK_W=64, ACC=accumulate, num_warps=4)
    return out
