"""Triton kernels of phase 1's fused iteration (fast/phase1.py; imported only where Triton runs).

One 64k-position chunk of a phase-1 iteration passes over its (n, C) activations in these
kernels only (the GEMMs aside):

- ``inputs``: the input contexts ``prev[i-1] + noise[i]`` (wrap-around at 0), in fp32 over the
  noise (the first layer's residual) and in the GEMM dtype (its product's operand): the roll,
  the addition and the cast in one pass.
- ``ln_fwd``: ``y = LN(r + ReLU(z + bias))`` for one layer, z read with any row stride (a
  column slice of the chunk's (n, L*C) pre-activation buffer), y in fp32 and the GEMM dtype
  (the fused layers' kernel, kernels.py).
- ``batch_stats`` / ``batch_spread``: per 8000-position batch the column sums of ``out``, the
  sum of ``(out - prev)^2`` and the count of positions whose mean squared change is below the
  convergence threshold; then the sum of ``||out - mean(out)||^2`` (a second pass: a one-pass
  ``sum(y^2) - b*||mean||^2`` cancels badly when the contexts are alike).
- ``ln_bwd``: the norm's backward for one layer; for the last layer ``dy`` is the loss's
  gradient formed inline from ``out``, ``prev``, the batch mean and two coefficients per batch
  (no ``dy`` tensor); dz is written over z in place (the buffer becomes the d z of all layers,
  the operand of the one d W_token GEMM). Rows of a batch whose loss is NaN/Inf give exact
  zeros everywhere, and the kernel zeroes that batch's rows of the layer's context operand too
  (they may hold NaN, and 0 * NaN is NaN in the d W_context GEMM): such a batch is skipped
  exactly as the plain path skips it, without a host sync.
- ``col_acc``: ``out += x.sum(0)`` of the per-program partial sums (d gamma, d beta, d bias;
  kernels.col_sum's kernel).
"""

from __future__ import annotations

import triton
import triton.language as tl

from archsearch.cvfp.fast.device import sm_count
from archsearch.cvfp.fast.kernels import _ln_shape, col_sum, ln_fwd_into


@triton.jit(do_not_specialize=["s", "n", "N"])
def _inputs_kernel(prev_ptr, noise_ptr, out16_ptr, s, n, N, C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # rows of the chunk
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < n)[:, None] & (cols < C)[None, :]
    g = s + rows.to(tl.int64)  # stream positions
    src = tl.where(g == 0, N - 1, g - 1)
    x = tl.load(prev_ptr + src[:, None] * C + cols[None, :], mask=mask, other=0.0)
    ofs = g[:, None] * C + cols[None, :]
    x = x + tl.load(noise_ptr + ofs, mask=mask, other=0.0)
    tl.store(noise_ptr + ofs, x, mask=mask)
    tl.store(out16_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], x.to(out16_ptr.dtype.element_ty), mask=mask)


def inputs(prev, noise, out16, s: int, e: int) -> None:
    """noise[s:e] <- prev[i-1] + noise[i] (position 0 reads prev[N-1]); ``out16`` (e-s, C) the same
    in its dtype."""
    N, C = prev.shape
    n = e - s
    block, rows, warps = _ln_shape(C)
    _inputs_kernel[(triton.cdiv(n, rows),)](prev, noise, out16, s, n, N, C=C, BLOCK_C=block, ROWS=rows, num_warps=warps)


def ln_fwd(z, zb, r, gamma, beta, eps: float, y, y16, mean, rstd) -> None:
    """y (and y16 where given) <- LN(r + ReLU(z + zb)); z (n, D) with unit column stride, any row
    stride; r, y, y16 contiguous (n, D); mean, rstd (n,) fp32. The layers' kernel (kernels.py),
    with z's row stride passed at run time and y16's rows D apart."""
    ln_fwd_into(z, zb, r, gamma, beta, eps, y, y16, mean, rstd, dense_z=False, dense_y16=True)


@triton.jit(do_not_specialize=["n", "B", "tiles", "thr"])
def _batch_stats_kernel(
    y_ptr, t_ptr, col_ptr, s1_ptr, conv_ptr, n, B, tiles, thr,
    C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    start = b * B
    end = tl.minimum(start + B, n)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc_col = tl.zeros([BLOCK_C], tl.float32)
    acc_s1 = tl.zeros([ROWS], tl.float32)
    acc_conv = tl.zeros([ROWS], tl.float32)
    for i in range(tiles):
        rows = start + (p * tiles + i) * ROWS + tl.arange(0, ROWS)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        ofs = rows[:, None].to(tl.int64) * C + cols[None, :]
        y = tl.load(y_ptr + ofs, mask=mask, other=0.0)
        d = y - tl.load(t_ptr + ofs, mask=mask, other=0.0)
        sq = tl.sum(d * d, axis=1)  # (ROWS,)
        acc_s1 += sq
        acc_conv += tl.where(rmask & (sq / C < thr), 1.0, 0.0)
        acc_col += tl.sum(y, axis=0)
    q = b * P + p
    tl.store(col_ptr + q * C + cols, acc_col, mask=cmask)
    tl.store(s1_ptr + q, tl.sum(acc_s1, axis=0))
    tl.store(conv_ptr + q, tl.sum(acc_conv, axis=0))


@triton.jit(do_not_specialize=["n", "B", "tiles"])
def _batch_spread_kernel(y_ptr, mu_ptr, s2_ptr, n, B, tiles, C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    b = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    start = b * B
    end = tl.minimum(start + B, n)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mu = tl.load(mu_ptr + b * C + cols, mask=cmask, other=0.0)
    acc = tl.zeros([ROWS], tl.float32)
    for i in range(tiles):
        rows = start + (p * tiles + i) * ROWS + tl.arange(0, ROWS)
        mask = (rows < end)[:, None] & cmask[None, :]
        y = tl.load(y_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0)
        d = tl.where(mask, y - mu[None, :], 0.0)
        acc += tl.sum(d * d, axis=1)
    tl.store(s2_ptr + b * P + p, tl.sum(acc, axis=0))


def batch_stats(y, t, B: int, thr: float, col, s1, conv):
    """Per batch b of ``B`` rows of y, t (n, C) fp32: col[b, p] column sums of y, s1[b, p] sums of
    (y - t)^2 and conv[b, p] counts of rows with mean((y - t)^2) < thr, per program p (the
    caller sums over p: the partial buffers are (nb, P, C) and (nb, P))."""
    n, C = y.shape
    nb, P = s1.shape
    block, rows, warps = _ln_shape(C)
    tiles = triton.cdiv(triton.cdiv(min(B, n), rows), P)
    _batch_stats_kernel[(nb, P)](y, t, col, s1, conv, n, B, tiles, thr, C=C, BLOCK_C=block, ROWS=rows, num_warps=warps)


def batch_spread(y, mu, B: int, s2):
    """s2[b, p]: per batch b the sum of ||y - mu[b]||^2 over program p's rows."""
    n, C = y.shape
    nb, P = s2.shape
    block, rows, warps = _ln_shape(C)
    tiles = triton.cdiv(triton.cdiv(min(B, n), rows), P)
    _batch_spread_kernel[(nb, P)](y, mu, s2, n, B, tiles, C=C, BLOCK_C=block, ROWS=rows, num_warps=warps)


def batch_programs(blen: int, nb: int, C: int, device) -> int:
    """Programs per batch of the batch reductions (about 4 per multiprocessor in all, at most one
    per row tile) for nb batches of blen rows of width C."""
    _, rows, _ = _ln_shape(C)
    return max(1, min(triton.cdiv(blen, rows), triton.cdiv(4 * sm_count(device), nb)))


@triton.jit(do_not_specialize=["n", "B", "per", "stride_z"])
def _ln_bwd_kernel(
    dy_ptr, y_ptr, t_ptr, mu_ptr, ca_ptr, cc_ptr, ok_ptr, z_ptr, stride_z, zb_ptr, r_ptr, g_ptr, mean_ptr, rstd_ptr,
    dr_ptr, c16_ptr, part_ptr, n, B, per,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, LOSS: tl.constexpr, WRITE_DR: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gamma = tl.load(g_ptr + cols, mask=cmask, other=0.0)
    zb = tl.load(zb_ptr + cols, mask=cmask, other=0.0)
    acc_g = tl.zeros([BLOCK_D], tl.float32)
    acc_b = tl.zeros([BLOCK_D], tl.float32)
    acc_z = tl.zeros([BLOCK_D], tl.float32)
    for i in range(per):
        rows = (pid * per + i) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n
        bidx = rows // B
        okv = tl.load(ok_ptr + bidx, mask=rmask, other=0.0)
        live = rmask & (okv > 0.5)
        mask = live[:, None] & cmask[None, :]
        full = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        ofs = rows64[:, None] * D + cols[None, :]
        if LOSS:
            yv = tl.load(y_ptr + ofs, mask=mask, other=0.0)
            tv = tl.load(t_ptr + ofs, mask=mask, other=0.0)
            mu = tl.load(mu_ptr + bidx[:, None] * D + cols[None, :], mask=mask, other=0.0)
            ca = tl.load(ca_ptr + bidx, mask=live, other=0.0)
            cc = tl.load(cc_ptr + bidx, mask=live, other=0.0)
            dy = tl.where(mask, ca[:, None] * (yv - tv) + cc[:, None] * (yv - mu), 0.0)
        else:
            dy = tl.load(dy_ptr + ofs, mask=mask, other=0.0)
        zofs = rows64[:, None] * stride_z + cols[None, :]
        z = tl.load(z_ptr + zofs, mask=mask, other=0.0).to(tl.float32) + zb[None, :]
        x = tl.load(r_ptr + ofs, mask=mask, other=0.0).to(tl.float32) + tl.maximum(z, 0.0)
        mean = tl.load(mean_ptr + rows, mask=live, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=live, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        acc_g += tl.sum(dy * xhat, axis=0)
        acc_b += tl.sum(dy, axis=0)
        wdy = dy * gamma[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        dx = tl.where(mask, (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None], 0.0)
        if WRITE_DR:
            tl.store(dr_ptr + ofs, dx, mask=full)
        dz = tl.where(mask & (z > 0.0), dx, 0.0)
        acc_z += tl.sum(dz, axis=0)
        tl.store(z_ptr + zofs, dz.to(z_ptr.dtype.element_ty), mask=full)
        dead = (rmask & (okv < 0.5))[:, None] & cmask[None, :]
        tl.store(c16_ptr + ofs, tl.zeros([ROWS, BLOCK_D], tl.float32).to(c16_ptr.dtype.element_ty), mask=dead)
    tl.store(part_ptr + pid * 3 * D + cols, acc_g, mask=cmask)
    tl.store(part_ptr + pid * 3 * D + D + cols, acc_b, mask=cmask)
    tl.store(part_ptr + pid * 3 * D + 2 * D + cols, acc_z, mask=cmask)


def bwd_programs(n: int, D: int, device) -> tuple[int, int]:
    """(programs, row tiles per program) of ln_bwd for n rows: at most 4 per multiprocessor
    (and never more than for any larger n: min(row tiles, 4 per multiprocessor) bounds both)."""
    _, rows, _ = _ln_shape(D)
    nblocks = triton.cdiv(n, rows)
    per = triton.cdiv(nblocks, min(nblocks, 4 * sm_count(device)))
    return triton.cdiv(nblocks, per), per


def max_bwd_programs(n: int, D: int, device) -> int:
    """An upper bound of bwd_programs' count for any row count up to n."""
    _, rows, _ = _ln_shape(D)
    return max(1, min(triton.cdiv(n, rows), 4 * sm_count(device)))


def ln_bwd(dy, loss, ok, z, zb, r, gamma, mean, rstd, dr, c16, part, B: int):
    """Backward of ln_fwd over n rows. ``dy`` (n, D) fp32, or None with ``loss`` = (y, t, mu,
    ca, cc): dy = ca[b] (y - t) + cc[b] (y - mu[b]) for the rows of batch b (B rows a batch).
    ``ok`` (nb,) fp32, 1 for a batch that counts, 0 for one skipped (its rows give zeros and
    its rows of ``c16``, the layer's context operand, are zeroed). dz is written over ``z``;
    ``dr`` (n, D) fp32 (may be ``dy`` itself) or None; ``part`` (programs, 3 D) receives the
    per-program sums of d gamma, d beta, d zb in its first rows (at least bwd_programs' count of
    them); returns that part of it."""
    n, D = z.shape
    block, rows, warps = _ln_shape(D)
    progs, per = bwd_programs(n, D, z.device)
    part = part[:progs]
    assert part.shape == (progs, 3 * D) and r.is_contiguous() and c16.is_contiguous() and z.stride(1) == 1
    y, t, mu, ca, cc = loss if loss is not None else (r, r, r, ok, ok)
    _ln_bwd_kernel[(progs,)](r if dy is None else dy, y, t, mu, ca, cc, ok, z, z.stride(0), zb, r, gamma, mean, rstd,
                             r if dr is None else dr, c16, part, n, B, per, D=D, BLOCK_D=block, ROWS=rows,
                             LOSS=loss is not None, WRITE_DR=dr is not None, num_warps=warps)  # fmt: skip
    return part


def col_acc(x, out) -> None:
    """out += x.sum(0) for a contiguous fp32 (P, W) x and contiguous (W,) out, in a fixed order."""
    col_sum(x, out, accumulate=True)
