"""The CVFP model (shared/reference/cvfp.md sections 1-3), as small nn.Modules.

Shapes: B positions in a batch, C context width, E embedding width, k input tokens,
L layers, V vocabulary. Every Linear is initialised N(0, init_std) (weights) and
N(0, init_bias_std) (biases) from one explicit generator, in module order, so the slow
reference implementation (reference.py) can draw the same parameters.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from archsearch.config import ModelConfig, token_widths


# On a GPU with Triton, LN(residual + ReLU(Linear(x))) runs as the Linear's GEMM without its
# bias, then one kernel forward and one backward (kernels.res_relu_ln_*) that add the bias and
# return its gradient with the LayerNorm's, instead of ~10 small ones; a switch for A/B measurements.
FUSED_NORM = True
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


class _ResidualReluNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, residual, weight, bias, eps: float, zbias):
        from archsearch.cvfp.kernels import res_relu_ln_fwd

        shape = z.shape
        z2, r2 = z.reshape(-1, shape[-1]).contiguous(), residual.reshape(-1, shape[-1]).contiguous()
        y, mean, rstd = res_relu_ln_fwd(z2, r2, weight, bias, eps, zbias)
        ctx.save_for_backward(z2, r2, weight, mean, rstd, zbias)
        ctx.shape = shape  # z and residual have the same shape (linear_relu_norm checks)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        from archsearch.cvfp.kernels import res_relu_ln_bwd

        z2, r2, weight, mean, rstd, zbias = ctx.saved_tensors
        need_dr = ctx.needs_input_grad[1]
        dz, dr, dg, db, dzb = res_relu_ln_bwd(dy.reshape(z2.shape).contiguous(), z2, r2, weight, mean, rstd, need_dr, zbias)
        return dz.view(ctx.shape), (dr.view(ctx.shape) if need_dr else None), dg, db, None, dzb


def linear_relu_norm(fc: nn.Linear, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(residual + ReLU(fc(x)))``; the result is fp32 (as autocast's LayerNorm gives).
    The fused path adds fc's bias in fp32 inside the norm kernel (autocast would round it to
    bf16 inside the GEMM): the same sum, rounded no worse."""
    if FUSED_NORM and _HAVE_TRITON and x.is_cuda and residual.shape == (*x.shape[:-1], fc.out_features):
        z = F.linear(x, fc.weight)  # (B, d_out), no bias
        return _ResidualReluNorm.apply(z, residual, norm.weight, norm.bias, norm.eps, fc.bias)
    return norm(residual + F.relu(fc(x)))


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes Linears in on this device type, or None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cat_for_linear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], -1)`` as a Linear's input. Under autocast the parts are cast to the
    autocast dtype before the concatenation, not the fp32 result after it: the same values
    (a cast is elementwise), half the bytes written and one kernel fewer per layer."""
    dtype = autocast_dtype(a.device.type)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    return torch.cat([a, b], dim=-1)


class TokenEmbedding(nn.Module):
    """The frozen pretrained embedding W (V, E) and its token vectors. The tied output head
    (logits = h W^T) is in head.py, fused with its cross-entropy."""

    def __init__(self, weight: torch.Tensor, num_input_tokens: int, eps: float = 1e-5):
        super().__init__()
        V, E = weight.shape
        self.vocab_size, self.embed_dim, self.k = V, E, num_input_tokens
        self.register_buffer("weight", weight.detach().float(), persistent=False)  # (V, E)
        # embed_norm is a LayerNorm(E) at its initial state (weight 1, bias 0) and is never
        # trained, so LN(W) is a fixed table; row V is the zero vector of "before the stream".
        normed = F.layer_norm(self.weight, (E,), eps=eps)
        self.register_buffer("normed", torch.cat([normed, normed.new_zeros(1, E)]), persistent=False)  # (V+1, E)

    def windows(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) token ids -> (N, k) ids of tokens t-k+1 .. t, oldest first; V before the start."""
        pad = ids.new_full((self.k - 1,), self.vocab_size)
        return torch.cat([pad, ids]).unfold(0, self.k, 1)  # (N, k)

    def vectors(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, k) window ids -> (B, E*k) concatenated normalised embeddings."""
        return self.normed[windows].flatten(1)  # (B, k, E) -> (B, E*k)


class ContextLayer(nn.Module):
    """(context[C], token_vector[E*k]) -> context[C]: LN(context + ReLU(Linear(concat)))."""

    def __init__(self, context_dim: int, token_dim: int, eps: float):
        super().__init__()
        self.fc = nn.Linear(context_dim + token_dim, context_dim)
        self.norm = nn.LayerNorm(context_dim, eps=eps)

    def forward(self, context: torch.Tensor, token_vec: torch.Tensor) -> torch.Tensor:
        return linear_relu_norm(self.fc, cat_for_linear(context, token_vec), context, self.norm)  # (B, C)


class ContextBlock(nn.Module):
    """L ContextLayers; every layer sees the same token vector."""

    def __init__(self, cfg: ModelConfig, embed_dim: int):
        super().__init__()
        token_dim = embed_dim * cfg.num_input_tokens
        self.context_dim = cfg.context_dim
        self.layers = nn.ModuleList(
            ContextLayer(cfg.context_dim, token_dim, cfg.layernorm_eps) for _ in range(cfg.num_layers)
        )

    def forward(self, context: torch.Tensor, token_vec: torch.Tensor, return_all: bool = False):
        """(B, C), (B, E*k) -> (B, C), or the list of the L layer outputs with return_all."""
        outs = []
        dtype = autocast_dtype(token_vec.device.type)
        if dtype is not None:  # cast once here, not in every layer's cat_for_linear
            token_vec = token_vec.to(dtype)
        for layer in self.layers:
            context = layer(context, token_vec)  # (B, C)
            outs.append(context)
        return outs if return_all else context


class TokenLayer(nn.Module):
    """(context_i[C], token[d_in]) -> token[d_out], with a projected residual when widths differ."""

    def __init__(self, context_dim: int, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.fc = nn.Linear(context_dim + d_in, d_out)
        self.proj = nn.Linear(d_in, d_out) if d_in != d_out else None
        self.norm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, context: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        residual = token if self.proj is None else self.proj(token)  # (B, d_out)
        return linear_relu_norm(self.fc, cat_for_linear(context, token), residual, self.norm)  # (B, d_out)


class TokenBlock(nn.Module):
    """L TokenLayers; layer i reads ContextBlock layer i's output; widths shrink E*k -> E."""

    def __init__(self, cfg: ModelConfig, embed_dim: int):
        super().__init__()
        widths = token_widths(embed_dim, cfg.num_input_tokens, cfg.num_layers)
        self.layers = nn.ModuleList(
            TokenLayer(cfg.context_dim, d_in, d_out, cfg.layernorm_eps) for d_in, d_out in zip(widths[:-1], widths[1:])
        )

    def forward(self, contexts: torch.Tensor, token_vec: torch.Tensor) -> torch.Tensor:
        """(L, B, C) per-layer contexts, (B, E*k) -> (B, E)."""
        h = token_vec
        for layer, context in zip(self.layers, contexts):
            h = layer(context, h)  # (B, d_{i+1})
        return h


@torch.no_grad()
def init_parameters(module: nn.Module, cfg: ModelConfig, generator: torch.Generator) -> None:
    """N(0, init_std) weights and N(0, init_bias_std) biases for every Linear, in module order;
    LayerNorms at weight 1, bias 0. Draws on ``generator`` (a CPU generator)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(torch.empty(m.weight.shape).normal_(0.0, cfg.init_std, generator=generator))
            if m.bias is not None:
                m.bias.copy_(torch.empty(m.bias.shape).normal_(0.0, cfg.init_bias_std, generator=generator))
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
