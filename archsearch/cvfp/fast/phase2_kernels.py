"""Triton kernels of phase 2's fused step (fast/phase2.py): the gradient clip and Adam over
flat buffers, in two launches (imported only where Triton is available).

1. ``_sq_partials_kernel``: per program the sum of squares of one contiguous span of the flat
   gradient (a fixed split: the total norm is summed in the same order every step); program 0
   also counts Adam's step on the device (capturable: no host sync).
2. ``_clip_adam_kernel``: every program sums the partials itself (a few hundred floats, read
   from L2), forms the clip's inverse factor max(1, (norm + 1e-6) / max_norm) (the factor
   min(1, max_norm / (norm + 1e-6)) of torch.nn.utils.clip_grad_norm_, applied as the fused Adam
   applies a ``grad_scale``: the gradient divided by it), then torch's fused Adam update
   (ATen's fused_adam_utils.cuh, weight decay 0, no amsgrad) on fp32 parameters, m and v, and
   writes the updated parameters' copy in the GEMM dtype (the bf16 shadow) too. The bias
   corrections 1 - beta ** step come from powers kept in fp64 on the device.
"""

from __future__ import annotations

import triton
import triton.language as tl

SQ_BLOCK = 1024
ADAM_BLOCK = 1024
MAX_PARTIALS = 256


@triton.jit(do_not_specialize=["n", "per"])
def _sq_partials_kernel(g_ptr, part_ptr, state_ptr, n, per, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * per
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(0, per, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + idx, mask=idx < n, other=0.0)
        acc += g * g
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))
    if pid == 0:  # Adam's step count and beta1 ** step, beta2 ** step (fp64), read by the next kernel only
        tl.store(state_ptr, tl.load(state_ptr) + 1.0)
        tl.store(state_ptr + 1, tl.load(state_ptr + 1) * tl.load(state_ptr + 3))
        tl.store(state_ptr + 2, tl.load(state_ptr + 2) * tl.load(state_ptr + 4))


@triton.jit(do_not_specialize=["n"])
def _clip_adam_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, p16_ptr, part_ptr, state_ptr, n, lr, eps, max_norm, one_minus_beta1, one_minus_beta2,
    NP: tl.constexpr, BLOCK: tl.constexpr, HAS_P16: tl.constexpr,
):  # fmt: skip
    parts = tl.load(part_ptr + tl.arange(0, NP))
    norm = tl.sqrt(tl.sum(parts, axis=0))
    inv_clip = tl.maximum((norm + 1e-6) / max_norm, 1.0)
    bc1 = (1.0 - tl.load(state_ptr + 1)).to(tl.float32)  # 1 - beta1 ** step
    bc2_sqrt = tl.sqrt(1.0 - tl.load(state_ptr + 2)).to(tl.float32)
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
    """Programs (a power of 2) of the norm's first pass over n elements."""
    return min(MAX_PARTIALS, triton.next_power_of_2(triton.cdiv(n, SQ_BLOCK)))


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


def clip_adam(p, g, m, v, p16, partials, state, lr: float, betas: tuple[float, float], eps: float, max_norm: float) -> None:
    """Clip by total norm, then one Adam step, over flat fp32 ``p`` (parameters), ``g`` (their
    gradient), ``m``, ``v`` (moments), all (n,); ``p16`` (n,) receives the new parameters in its
    dtype (None: not written); ``partials`` (partial_programs(n),) fp32 scratch; ``state``:
    :func:`adam_state` of the same ``betas`` (its step and powers advanced here)."""
    n = p.numel()
    NP = partials.numel()
    assert NP == partial_programs(n) and all(t.is_contiguous() and t.numel() == n for t in (p, g, m, v))
    per = triton.cdiv(triton.cdiv(n, NP), SQ_BLOCK) * SQ_BLOCK
    _sq_partials_kernel[(NP,)](g, partials, state, n, per, BLOCK=SQ_BLOCK, num_warps=4)
    b1, b2 = betas
    _clip_adam_kernel[(triton.cdiv(n, ADAM_BLOCK),)](p, g, m, v, p if p16 is None else p16, partials, state, n, lr, eps,
                                                     max_norm, 1.0 - b1, 1.0 - b2, NP=NP, BLOCK=ADAM_BLOCK, HAS_P16=p16 is not None,
                                                     num_warps=4)  # fmt: skip
