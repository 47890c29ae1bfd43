"""The tied, frozen output head and its cross-entropy: logits = h W^T, W the frozen embedding.

Phase 2 spends most of its arithmetic here (E x V = 768 x 50257 per token, forward and
backward). The head has no trainable weight, so its backward needs only d loss / d h =
(softmax - onehot) W / n. On a GPU with Triton, :class:`_FusedTiedCE` computes the loss and
that gradient during the forward, in row chunks, without keeping the (n, V) logits or making
an fp32 copy of them. Elsewhere the plain PyTorch expression is used. Both compute the mean
cross-entropy of the same logits; only the arithmetic order differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archsearch.cvfp.fast.device import triton_available

CHUNK_ROWS = 4096


PAD_ROWS = 64


class HeadWeight:
    """The head matrix in the dtype its products use. For the fused GPU path its rows are
    zero-padded to a multiple of 64: a (n, 50257) bf16 logits row is not 16-byte aligned,
    which keeps cuBLAS off its fast kernels. Padded logits are never read (the kernel stops
    at ``vocab_size``) and padded rows of W are zero, so they add nothing to d loss / d h."""

    def __init__(self, weight: torch.Tensor, precision: str):
        w = weight.to(torch.bfloat16) if precision == "bf16" else weight
        self.vocab_size = w.shape[0]
        self.fused = use_fused(w.device)
        if self.fused and self.vocab_size % PAD_ROWS:
            w = torch.cat([w, w.new_zeros(PAD_ROWS - self.vocab_size % PAD_ROWS, w.shape[1])])
        self.matrix = w.contiguous()
        self.chunk_rows = CHUNK_ROWS
        """Rows of logits formed at a time by the fused path."""

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype


def head_weight(weight: torch.Tensor, precision: str) -> HeadWeight:
    return HeadWeight(weight, precision)


def use_fused(device: torch.device) -> bool:
    return triton_available(device)


class _FusedTiedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, row_weight: torch.Tensor | None,
                chunk: int) -> torch.Tensor:  # fmt: skip
        from archsearch.cvfp.fast.kernels import ce_rows

        n = h.shape[0]
        hw = h.to(weight.dtype)
        grad_h = torch.empty_like(hw)
        loss = torch.empty(n, device=h.device, dtype=torch.float32)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = hw[s:e] @ weight.T  # (c, V)
            ce_rows(logits, targets[s:e], loss[s:e], None, grad_scale=1.0 / n, write_grad=True, vocab_size=vocab_size,
                    row_scale=None if row_weight is None else row_weight[s:e])  # fmt: skip
            torch.matmul(logits, weight, out=grad_h[s:e])  # (c, E) = d loss / d h
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return loss.mean() if row_weight is None else torch.dot(loss, row_weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out).to(ctx.h_dtype), None, None, None, None, None


def train_loss(h: torch.Tensor, head: HeadWeight, targets: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the tied head on ``h`` (n, E), differentiable w.r.t. ``h``; with
    ``row_weight`` (n,) fp32 the weighted sum sum_i w_i CE_i instead (weights 1/r on r rows and
    0 elsewhere give the mean over those r rows: how a CUDA graph captured for full batches
    runs a shorter one)."""
    if head.fused:
        return _FusedTiedCE.apply(h, head.matrix, targets, head.vocab_size, row_weight, head.chunk_rows)
    logits = h.to(head.dtype) @ head.matrix.T  # (n, V)
    if row_weight is None:
        return F.cross_entropy(logits.float(), targets)
    return torch.dot(F.cross_entropy(logits.float(), targets, reduction="none"), row_weight)


@torch.no_grad()
def eval_sums(h: torch.Tensor, head: HeadWeight, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of the rows' cross-entropies, sum of their squares, both float64; number of argmax
    hits) over the rows of ``h``. The fused path squares the kernel's per-row losses (one
    small elementwise pass over n floats, no second look at the logits)."""
    weight = head.matrix
    hw = h.to(weight.dtype)
    if head.fused:
        from archsearch.cvfp.fast.kernels import ce_rows

        n = h.shape[0]
        loss = torch.empty(n, device=h.device, dtype=torch.float32)
        argmax = torch.empty(n, device=h.device, dtype=torch.int32)
        for s in range(0, n, head.chunk_rows):
            e = min(s + head.chunk_rows, n)
            ce_rows(hw[s:e] @ weight.T, targets[s:e], loss[s:e], argmax[s:e], write_grad=False, vocab_size=head.vocab_size)
        loss64 = loss.double()
        return loss64.sum(), loss64.pow(2).sum(), (argmax.long() == targets).sum()
    logits = hw @ weight.T  # (n, V)
    logp = logits.float().log_softmax(dim=-1)  # F.cross_entropy's own two steps
    ce = F.nll_loss(logp, targets, reduction="sum").double()
    sq = F.nll_loss(logp, targets, reduction="none").double().pow(2).sum()
    return ce, sq, (logits.argmax(dim=-1) == targets).sum()
