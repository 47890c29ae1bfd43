"""Triton kernels of phase 2's fused step (fast/phase2.py) (imported only where Triton is
available): the gradient clip and Adam over flat buffers, in two launches; a batch's contexts
copied into every layer's GEMM input in one launch; the token vectors gathered into the first
layer's GEMM input; the step's loss added to the epoch's sum.

1. ``_sq_norm_kernel``: per program the sum of squares of one contiguous span of the flat
   gradient (a fixed split), then an atomic count of the programs done; the last one sums the
   partials in a fixed order (so the norm is the same whichever program finishes last), forms
   the clip's inverse factor max(1, (norm + 1e-6) / max_norm) (the factor min(1, max_norm /
   (norm + 1e-6)) of torch.nn.utils.clip_grad_norm_, applied as the fused Adam applies a
   ``grad_scale``: the gradient divided by it), counts Adam's step on the device (capturable:
   no host sync) and resets the count of programs for the next launch.
2. ``_clip_adam_kernel``: torch's Adam update (torch.optim.Adam's formula, weight decay 0, no
   amsgrad) on fp32 parameters, m and v, the gradient divided by that factor; it writes the
   updated parameters' copy in the GEMM dtype (the bf16 shadow) too. The bias corrections
   1 - beta ** step come from powers kept in fp64 on the device.
"""

from __future__ import annotations

import triton
import triton.language as tl

SQ_BLOCK = 4096
ADAM_BLOCK = 2048
MAX_PARTIALS = 1024


@triton.jit(do_not_specialize=["n", "per", "max_norm"])
def _sq_norm_kernel(g_ptr, part_ptr, count_ptr, state_ptr, n, per, max_norm, NP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * per
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(0, per, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + idx, mask=idx < n, other=0.0)
        acc += g * g
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))
    done = tl.atomic_add(count_ptr, 1)  # acq_rel: this program's partial is visible to the last one
    if done == NP - 1:
        parts = tl.load(part_ptr + tl.arange(0, NP), volatile=True)
        norm = tl.sqrt(tl.sum(parts, axis=0))
        tl.store(part_ptr + NP, tl.maximum((norm + 1e-6) / max_norm, 1.0))  # the clip's inverse factor
        # Adam's step count and beta1 ** step, beta2 ** step (fp64)
        tl.store(state_ptr, tl.load(state_ptr) + 1.0)
        tl.store(state_ptr + 1, tl.load(state_ptr + 1) * tl.load(state_ptr + 3))
        tl.store(state_ptr + 2, tl.load(state_ptr + 2) * tl.load(state_ptr + 4))
        tl.atomic_xchg(count_ptr, 0)


@triton.jit(do_not_specialize=["n"])
def _clip_adam_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, p16_ptr, scale_ptr, state_ptr, n, lr, eps, one_minus_beta1, one_minus_beta2,
    BLOCK: tl.constexpr, HAS_P16: tl.constexpr,
):  # fmt: skip
    inv_clip = tl.load(scale_ptr)
    bc1 = (1.0 - tl.load(state_ptr + 1)).to(tl.float32)  # 1 - beta1 ** step
    bc2_sqrt = tl.sqrt((1.0 - tl.load(state_ptr + 2)).to(tl.float32))
    beta2 = tl.load(state_ptr + 4).to(tl.float32)
    step_size = lr / bc1
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    p = tl.load(p_ptr + idx, mask=mask, other=0.0)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0) / inv_clip
    m = tl.load(m_ptr + idx, mask=mask, other=0.0)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0)
    m = m + one_minus_beta1 * (g - m)  # torch's Adam: m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, 1 - beta2)
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * m / denom
    tl.store(p_ptr + idx, p, mask=mask)
    tl.store(m_ptr + idx, m, mask=mask)
    tl.store(v_ptr + idx, v, mask=mask)
    if HAS_P16:
        tl.store(p16_ptr + idx, p.to(p16_ptr.dtype.element_ty), mask=mask)


def partial_programs(n: int) -> int:
    """Programs (a power of 2) of the norm's pass over n elements."""
    return min(MAX_PARTIALS, triton.next_power_of_2(triton.cdiv(n, SQ_BLOCK)))


def norm_scratch(n: int, device):
    """(partials, count) scratch of :func:`clip_adam` for n elements: partial_programs(n) + 1
    fp32 (the partials, then the clip's factor) and one int32 count of programs done (0 between
    launches)."""
    import torch

    return torch.zeros(partial_programs(n) + 1, device=device), torch.zeros(1, device=device, dtype=torch.int32)


def adam_state(betas: tuple[float, float], device):
    """Adam's state for :func:`clip_adam` at step 0: (step, beta1 ** step, beta2 ** step, beta1,
    beta2), fp64 on the device (the bias corrections as exact as the plain Adam's, which forms
    them in Python floats)."""
    import torch

    state = torch.empty(5, dtype=torch.float64, device=device)  # filled by kernels: no host-to-device copy
    state[3] = betas[0]
    state[4] = betas[1]
    reset_adam_state(state)
    return state


def reset_adam_state(state) -> None:
    """Back to step 0 (in place: a captured graph holds the tensor)."""
    state[0] = 0.0
    state[1:3] = 1.0


def clip_adam(p, g, m, v, p16, scratch, state, lr: float, betas: tuple[float, float], eps: float, max_norm: float) -> None:
    """Clip by total norm, then one Adam step, over flat fp32 ``p`` (parameters), ``g`` (their
    gradient), ``m``, ``v`` (moments), all (n,); ``p16`` (n,) receives the new parameters in its
    dtype (None: not written); ``scratch``: :func:`norm_scratch` (n); ``state``:
    :func:`adam_state` of the same ``betas`` (its step and powers advanced here)."""
    n = p.numel()
    partials, count = scratch
    NP = partials.numel() - 1
    assert NP == partial_programs(n) and all(t.is_contiguous() and t.numel() == n for t in (p, g, m, v))
    per = triton.cdiv(triton.cdiv(n, NP), SQ_BLOCK) * SQ_BLOCK
    _sq_norm_kernel[(NP,)](g, partials, count, state, n, per, max_norm, NP=NP, BLOCK=SQ_BLOCK, num_warps=8)
    b1, b2 = betas
    _clip_adam_kernel[(triton.cdiv(n, ADAM_BLOCK),)](p, g, m, v, p if p16 is None else p16, partials[NP:], state, n, lr, eps,
                                                     1.0 - b1, 1.0 - b2, BLOCK=ADAM_BLOCK, HAS_P16=p16 is not None,
                                                     num_warps=8)  # fmt: skip


@triton.jit(do_not_specialize=["n"])
def _gather_tokens_kernel(
    table_ptr, win_ptr, out16_ptr, stride16, out32_ptr, n,
    K: tl.constexpr, E: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr, HAS_32: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n
    cols = tl.arange(0, BLOCK_E)
    mask = rmask[:, None] & (cols < E)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    for j in tl.static_range(K):
        ids = tl.load(win_ptr + rows * K + j, mask=rmask, other=0).to(tl.int64)
        x = tl.load(table_ptr + ids[:, None] * E + cols[None, :], mask=mask, other=0.0)
        tl.store(out16_ptr + r64 * stride16 + j * E + cols[None, :], x.to(out16_ptr.dtype.element_ty), mask=mask)
        if HAS_32:
            tl.store(out32_ptr + r64 * (K * E) + j * E + cols[None, :], x, mask=mask)


def gather_tokens(table, windows, out16, out32=None) -> None:
    """The token vectors of ``windows`` (n, k) ids: rows of the (V+1, E) fp32 ``table``,
    concatenated (model.token_vectors), into ``out16`` (n, k*E) in its dtype (any row stride,
    unit column stride: a layer's GEMM input in place) and, where given, ``out32`` (n, k*E)
    contiguous fp32 too; one pass over the table's rows."""
    n, K = windows.shape
    E = table.shape[1]
    assert table.is_contiguous() and windows.is_contiguous() and out16.shape == (n, K * E) and out16.stride(1) == 1
    assert out32 is None or (out32.shape == (n, K * E) and out32.is_contiguous() and out32.dtype == table.dtype)
    block = triton.next_power_of_2(E)
    rows = max(1, min(16, 4096 // block))
    _gather_tokens_kernel[(triton.cdiv(n, rows),)](table, windows, out16, out16.stride(0), out16 if out32 is None else out32, n,
                                                    K=K, E=E, BLOCK_E=block, ROWS=rows, HAS_32=out32 is not None,
                                                    num_warps=4)  # fmt: skip


@triton.jit(do_not_specialize=["n"])
def _loss_sum_kernel(loss_ptr, w_ptr, rows_ptr, sum_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = idx < n
        acc += tl.load(loss_ptr + idx, mask=m, other=0.0) * tl.load(w_ptr + idx, mask=m, other=0.0)
    step_loss = tl.sum(acc, axis=0)  # the step's loss (the weighted mean CE), fp32
    tl.store(sum_ptr, tl.load(sum_ptr) + step_loss.to(tl.float64) * tl.load(rows_ptr))


def add_loss(loss_rows, row_weight, rows, loss_sum) -> None:
    """loss_sum (fp64) += rows (fp64, ()) * sum_i loss_rows[i] * row_weight[i] (the step's
    weighted mean cross-entropy times its rows), one program."""
    n = loss_rows.numel()
    assert row_weight.numel() == n
    _loss_sum_kernel[(1,)](loss_rows, row_weight, rows, loss_sum, n, BLOCK=1024, num_warps=4)


@triton.jit(do_not_specialize=["stride_l", "stride_n", "s", "r"])
def _fill_contexts_kernel(src_ptr, stride_l, stride_n, s, r, dst_ptr, meta_ptr, C: tl.constexpr, BLOCK_C: tl.constexpr,
                          ROWS: tl.constexpr):  # fmt: skip
    layer = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < r)[:, None] & (cols < C)[None, :]
    base = tl.load(meta_ptr + 2 * layer)
    stride = tl.load(meta_ptr + 2 * layer + 1)
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(src_ptr + layer.to(tl.int64) * stride_l + (s + r64) * stride_n + cols[None, :], mask=mask, other=0.0)
    tl.store(dst_ptr + base + r64 * stride + cols[None, :], x.to(dst_ptr.dtype.element_ty), mask=mask)


def layer_inputs_meta(flat, packed):
    """The (L, 2) int64 device table of :func:`fill_contexts`: per layer its GEMM input's offset
    in ``flat`` (elements) and row stride. Filled by kernels (no host-to-device copy)."""
    import torch

    meta = torch.empty(len(packed), 2, device=flat.device, dtype=torch.int64)
    for i, buf in enumerate(packed):
        assert buf.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() and buf.stride(1) == 1
        meta[i, 0] = buf.storage_offset() - flat.storage_offset()
        meta[i, 1] = buf.stride(0)
    return meta


def fill_contexts(cache, s: int, e: int, flat, meta) -> None:
    """Rows s..e of the (L, n, C) context cache (any float dtype, unit column stride) into the
    first C columns of the first e - s rows of every layer's GEMM input (views of ``flat``,
    located by ``meta``: :func:`layer_inputs_meta`), cast to their dtype; one launch."""
    L, _, C = cache.shape
    assert cache.stride(2) == 1 and meta.shape == (L, 2)
    r = e - s
    block = triton.next_power_of_2(C)
    rows = max(1, min(16, 4096 // block))
    _fill_contexts_kernel[(triton.cdiv(r, rows), L)](cache, cache.stride(0), cache.stride(1), s, r, flat, meta, C=C,
                                                     BLOCK_C=block, ROWS=rows, num_warps=4)  # fmt: skip
