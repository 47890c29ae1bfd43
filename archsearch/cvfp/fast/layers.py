"""Fused layers: LN(residual + ReLU(W [context, x] + b)) as one autograd Function (CUDA + Triton).

Drop-ins for the plain blocks of ``model.py``: :class:`FusedContextBlock` and
:class:`FusedTokenBlock` are built from a plain block and share its very submodules (the same
parameters, the same ``state_dict`` keys), so the plain block trains through them. They accept
only the standard form (:func:`standard_context_block` / :func:`standard_token_block`: the exact
classes of model.py); anything else stays plain.

The Function: forward is the concatenation, one GEMM without the bias, then
kernels.res_relu_ln_fwd, which adds the bias in fp32 (autocast would round it to bf16 inside
the GEMM: the same sum, rounded no worse). Backward is kernels.res_relu_ln_bwd (d z, d r, and
d gamma, d beta, d bias in one reduction), then only the products that are asked for: d W
(fp32, written by the GEMM), d context and d x only where they need a gradient (contexts are
constants in phase 2, the token vector is one in the ContextBlock), with the residual's
gradient added by the same GEMM where the residual is one of the two inputs. Autograd through
F.linear would form d [context, x] whole, cast it and add the residual's part separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archsearch.cvfp.fast.device import gemm_caps
from archsearch.cvfp.model import ContextBlock, ContextLayer, TokenBlock, TokenLayer
from archsearch.cvfp.precision import autocast_dtype


def standard_context_block(block: nn.Module) -> bool:
    return type(block) is ContextBlock and all(type(layer) is ContextLayer for layer in block.layers)


def standard_token_block(block: nn.Module) -> bool:
    return type(block) is TokenBlock and all(type(layer) is TokenLayer for layer in block.layers)


def _mm(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``add + a @ b`` (``add`` may be None; it is a scratch tensor the caller gives up) as
    ``dtype``: with bf16 operands and fp32 wanted, one GEMM writes fp32 and adds ``add`` itself
    where the build can (no cast or add kernels), into ``add`` where it can (no copy of it)."""
    if a.dtype != dtype and dtype == torch.float32:
        f32_out, in_place = gemm_caps(a.device)
        if f32_out:
            if add is None:
                return torch.mm(a, b, out_dtype=dtype)
            return torch.addmm(add, a, b, out_dtype=dtype, out=add) if in_place else torch.addmm(add, a, b, out_dtype=dtype)
    if add is not None and add.dtype == a.dtype:
        return torch.addmm(add, a, b, out=add) if add.dtype == dtype else torch.addmm(add, a, b).to(dtype)
    out = torch.mm(a, b).to(dtype)
    return out if add is None else out + add


class _CatLinearResReluNorm(torch.autograd.Function):
    """``y = LN(r + ReLU([a, b] W^T + bias))`` (fp32), r being ``a``, ``b`` or a tensor of its own
    (``res_of`` 0, 1 or -1). ``packed`` (n, Ca + Cb), where given, already holds [a, b] in the
    GEMM's dtype (no concatenation); ``out16``, a view of the next layer's ``packed``, receives
    y in that dtype too."""

    @staticmethod
    def forward(ctx, a, b, r, weight, bias, gamma, beta, eps: float, res_of: int, dtype: torch.dtype, packed=None, out16=None):
        from archsearch.cvfp.fast.kernels import res_relu_ln_fwd

        x = torch.cat([a.to(dtype), b.to(dtype)], dim=-1) if packed is None else packed  # (n, Ca + Cb)
        w = weight.to(dtype)  # (d_out, Ca + Cb)
        z = torch.mm(x, w.t())  # (n, d_out), no bias
        r = r.contiguous()
        y, mean, rstd = res_relu_ln_fwd(z, r, gamma, beta, eps, bias, out16)
        ctx.save_for_backward(x, w, z, r, gamma, mean, rstd, bias)
        ctx.res_of, ctx.split, ctx.in_dtypes = res_of, a.shape[-1], (a.dtype, b.dtype, r.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        from archsearch.cvfp.fast.kernels import res_relu_ln_bwd

        x, w, z, r, gamma, mean, rstd, bias = ctx.saved_tensors
        need_a, need_b, need_r, need_w = ctx.needs_input_grad[:4]
        res_of, split = ctx.res_of, ctx.split
        need_dr = need_r if res_of < 0 else (need_a, need_b)[res_of]
        dz, dr, dgamma, dbeta, dbias = res_relu_ln_bwd(dy.contiguous(), z, r, gamma, mean, rstd, need_dr, bias)
        dw = _mm(dz.t(), x, None, torch.float32) if need_w else None  # (d_out, Ca + Cb)
        da = _mm(dz, w[:, :split], dr if res_of == 0 else None, ctx.in_dtypes[0]) if need_a else None
        db = _mm(dz, w[:, split:], dr if res_of == 1 else None, ctx.in_dtypes[1]) if need_b else None
        dr_own = dr if res_of < 0 and need_r else None
        return da, db, dr_own, dw, dbias, dgamma, dbeta, None, None, None, None, None


def _fused(layer: nn.Module, context, x, residual, packed=None, out16=None) -> torch.Tensor:
    """The plain layer's function through the fused Function (2-D inputs; the plain form else)."""
    fc, norm = layer.fc, layer.norm
    if context.dim() != 2 or residual.shape != (context.shape[0], fc.out_features):
        return norm(residual + F.relu(fc(torch.cat([context, x], dim=-1))))
    dtype = autocast_dtype(context.device.type) or context.dtype
    res_of = 0 if residual is context else 1 if residual is x else -1
    if packed is not None:
        assert packed.dtype == dtype and packed.shape == (context.shape[0], fc.in_features)
    return _CatLinearResReluNorm.apply(context, x, residual, fc.weight, fc.bias, norm.weight, norm.bias, norm.eps, res_of, dtype, packed, out16)


class FusedContextLayer(nn.Module):
    def __init__(self, plain: ContextLayer):
        super().__init__()
        self.context_dim, self.fc, self.norm = plain.context_dim, plain.fc, plain.norm

    def forward(self, context: torch.Tensor, token_vec: torch.Tensor) -> torch.Tensor:
        return _fused(self, context, token_vec, context)  # (B, C)


class FusedContextBlock(nn.Module):
    """ContextBlock's API and state_dict; its layers are fused views of the plain block's."""

    def __init__(self, plain: ContextBlock):
        super().__init__()
        assert standard_context_block(plain)
        self.context_dim = plain.context_dim
        self.layers = nn.ModuleList(FusedContextLayer(layer) for layer in plain.layers)

    def forward(self, context: torch.Tensor, token_vec: torch.Tensor, return_all: bool = False):
        outs = []
        dtype = autocast_dtype(token_vec.device.type)
        if dtype is not None:  # cast once here, not in every layer
            token_vec = token_vec.to(dtype)
        for layer in self.layers:
            context = layer(context, token_vec)  # (B, C)
            outs.append(context)
        return outs if return_all else context

    def phase1_fast(self, emb, windows: torch.Tensor, cfg):
        """Phase 1's fused iteration (fast/phase1.py) where ``engine.phase1_fused`` is on and the
        run is bf16, else None (phases.train_phase1 then runs its plain iteration through this
        block). fp32 and tf32 runs take the plain iteration: on an H200 the fused iteration in fp32
        differed from the plain fp32 one by 6e-4 to 1.6e-3 (relative, tests/test_gpu.py), more than
        fp32 rounding explains, and the cause is not found (benchmarks/NOTES.md, v11)."""
        if not cfg.engine.phase1_fused or cfg.engine.precision != "bf16":
            return None
        from archsearch.cvfp.fast.phase1 import FusedPhase1

        return FusedPhase1(self.layers, self.context_dim, emb, windows, cfg)


class FusedTokenLayer(nn.Module):
    def __init__(self, plain: TokenLayer):
        super().__init__()
        self.context_dim, self.fc, self.proj, self.norm = plain.context_dim, plain.fc, plain.proj, plain.norm

    def forward(self, context: torch.Tensor, token: torch.Tensor, packed=None, out16=None) -> torch.Tensor:
        residual = token if self.proj is None else self.proj(token)  # (B, d_out)
        return _fused(self, context, token, residual, packed, out16)  # (B, d_out)


class FusedTokenBlock(nn.Module):
    """TokenBlock's API and state_dict, plus :meth:`forward_packed` for the captured graphs."""

    def __init__(self, plain: TokenBlock):
        super().__init__()
        assert standard_token_block(plain)
        self.context_dim = plain.context_dim
        self.layers = nn.ModuleList(FusedTokenLayer(layer) for layer in plain.layers)

    def forward(self, contexts, token_vec: torch.Tensor) -> torch.Tensor:
        h = token_vec
        for layer, context in zip(self.layers, contexts):
            h = layer(context, h)  # (B, d_{i+1})
        return h

    def forward_packed(self, token_vec: torch.Tensor, packed: list[torch.Tensor]) -> torch.Tensor:
        """``packed``: per layer a (B, C + d_in) GEMM input whose first C columns hold that
        layer's context. The token vector is cast into the first one's other columns and each
        layer's norm writes its output into the next one's: no layer concatenates."""
        C = self.context_dim
        packed[0][:, C:].copy_(token_vec)
        h = token_vec
        for i, layer in enumerate(self.layers):
            out16 = packed[i + 1][:, C:] if i + 1 < len(self.layers) else None
            h = layer(packed[i][:, :C], h, packed[i], out16)  # (B, d_{i+1})
        return h


def forward_packed(tblock: nn.Module, token_vec: torch.Tensor, packed: list[torch.Tensor]) -> torch.Tensor:
    """A TokenBlock's output from per-layer GEMM inputs (see FusedTokenBlock.forward_packed);
    a plain block reads its contexts from them and concatenates as usual."""
    if isinstance(tblock, FusedTokenBlock):
        return tblock.forward_packed(token_vec, packed)
    return tblock([p[:, : tblock.context_dim] for p in packed], token_vec)
