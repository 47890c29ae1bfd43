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

from archsearch.cvfp.recurrent import triton_available

CHUNK_ROWS = 4096


def head_weight(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """The head matrix in the dtype its matrix products use."""
    return weight.to(torch.bfloat16) if precision == "bf16" else weight


def use_fused(device: torch.device) -> bool:
    return triton_available(device)


class _FusedTiedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from archsearch.cvfp.kernels import ce_rows

        n = h.shape[0]
        hw = h.to(weight.dtype)
        grad_h = torch.empty_like(hw)
        loss = torch.empty(n, device=h.device, dtype=torch.float32)
        argmax = torch.empty(n, device=h.device, dtype=torch.int32)
        for s in range(0, n, CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, n)
            logits = hw[s:e] @ weight.T  # (c, V)
            ce_rows(logits, targets[s:e], loss[s:e], argmax[s:e], grad_scale=1.0 / n, write_grad=True)
            torch.matmul(logits, weight, out=grad_h[s:e])  # (c, E) = d mean-loss / d h
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return loss.mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out).to(ctx.h_dtype), None, None


def train_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the tied head on ``h`` (n, E), differentiable w.r.t. ``h``."""
    if use_fused(h.device):
        return _FusedTiedCE.apply(h, weight, targets)
    logits = h.to(weight.dtype) @ weight.T  # (n, V)
    return F.cross_entropy(logits.float(), targets)


@torch.no_grad()
def eval_sums(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy as float64, number of argmax hits) over the rows of ``h``."""
    hw = h.to(weight.dtype)
    if use_fused(h.device):
        from archsearch.cvfp.kernels import ce_rows

        n = h.shape[0]
        loss = torch.empty(n, device=h.device, dtype=torch.float32)
        argmax = torch.empty(n, device=h.device, dtype=torch.int32)
        for s in range(0, n, CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, n)
            ce_rows(hw[s:e] @ weight.T, targets[s:e], loss[s:e], argmax[s:e], write_grad=False)
        return loss.double().sum(), (argmax.long() == targets).sum()
    logits = hw @ weight.T
    ce = F.cross_entropy(logits.float(), targets, reduction="sum").double()
    return ce, (logits.argmax(dim=-1) == targets).sum()
