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


# On a GPU with Triton, LN(residual + ReLU(Linear(cat(a, b)))) runs as one autograd Function:
# the Linear's GEMM without its bias, one kernel forward and one backward (kernels.res_relu_ln_*)
# that add the bias and return its gradient with the LayerNorm's, and only the backward GEMMs
# that are needed, instead of ~10 small kernels and a full-width d input; a switch for A/B
# measurements.
FUSED_NORM = True
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


_GEMM_CAPS: dict = {}


def _gemm_caps(device: torch.device) -> tuple[bool, bool]:
    """(whether this build's CUDA GEMMs write fp32 from bf16 operands (``out_dtype``, torch 2.8+),
    whether such an addmm may write into its own fp32 addend, sparing the copy of it)."""
    if device not in _GEMM_CAPS:
        a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        try:
            torch.mm(a, a, out_dtype=torch.float32)
            torch.addmm(torch.zeros(16, 16, device=device), a, a, out_dtype=torch.float32)
            f32_out = True
        except (RuntimeError, TypeError):
            f32_out = False
        in_place = False
        if f32_out:
            try:
                c = torch.ones(16, 16, device=device)
                torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
                in_place = bool((c == 17.0).all())
            except (RuntimeError, TypeError):
                pass
        _GEMM_CAPS[device] = (f32_out, in_place)
    return _GEMM_CAPS[device]


def _mm(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``add + a @ b`` (``add`` may be None; it is a scratch tensor the caller gives up) as
    ``dtype``: with bf16 operands and fp32 wanted, one GEMM writes fp32 and adds ``add`` itself
    where the build can (no cast or add kernels), into ``add`` where it can (no copy of it)."""
    if a.dtype != dtype and dtype == torch.float32:
        f32_out, in_place = _gemm_caps(a.device)
        if f32_out:
            if add is None:
                return torch.mm(a, b, out_dtype=dtype)
            return torch.addmm(add, a, b, out_dtype=dtype, out=add) if in_place else torch.addmm(add, a, b, out_dtype=dtype)
    if add is not None and add.dtype == a.dtype:
        return torch.addmm(add, a, b, out=add) if add.dtype == dtype else torch.addmm(add, a, b).to(dtype)
    out = torch.mm(a, b).to(dtype)
    return out if add is None else out + add


class _CatLinearResReluNorm(torch.autograd.Function):
    """``y = LN(r + ReLU([a, b] W^T + bias))`` (fp32), r being ``a``, ``b`` or a tensor of its own.

    Forward: the concatenation, one GEMM without the bias, then kernels.res_relu_ln_fwd, which
    adds the bias in fp32. Backward: kernels.res_relu_ln_bwd (d z, d r, and d gamma, d beta,
    d bias in one reduction), then only the products that are asked for: d W (fp32, written by
    the GEMM), d a = d z W_a and d b = d z W_b only where a or b needs a gradient (contexts are
    constants in phase 2, the token vector is one in the ContextBlock, and so is phase 1's
    first input context), with r's gradient added by the same GEMM where r is a or b.
    Autograd through F.linear would form d [a, b] whole, cast it and add the residual's part
    in kernels of their own."""

    @staticmethod
    def forward(ctx, a, b, r, weight, bias, gamma, beta, eps: float, res_of: int, dtype: torch.dtype, packed=None, out16=None):
        from archsearch.cvfp.kernels import res_relu_ln_fwd

        if packed is None:
            x = torch.cat([a.to(dtype), b.to(dtype)], dim=-1)  # (n, Ca + Cb)
        else:  # [a, b] already in place (see TokenBlock.forward)
            x = packed
        w = weight.to(dtype)
        z = torch.mm(x, w.t())  # (n, d_out), no bias
        r = r.contiguous()
        y, mean, rstd = res_relu_ln_fwd(z, r, gamma, beta, eps, bias, out16)
        ctx.save_for_backward(x, w, z, r, gamma, mean, rstd, bias)
        ctx.res_of, ctx.split, ctx.in_dtypes = res_of, a.shape[-1], (a.dtype, b.dtype, r.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        from archsearch.cvfp.kernels import res_relu_ln_bwd

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


def fused_layers(device: torch.device) -> bool:
    """Whether cat_linear_relu_norm runs as the fused autograd Function on this device."""
    return FUSED_NORM and _HAVE_TRITON and device.type == "cuda"


def cat_linear_relu_norm(
    fc: nn.Linear, a: torch.Tensor, b: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm, packed=None, out16=None
) -> torch.Tensor:
    """``norm(residual + ReLU(fc(cat([a, b], -1))))`` for 2-D a, b; the result is fp32 (as
    autocast's LayerNorm gives). On a GPU with Triton it is one autograd Function
    (_CatLinearResReluNorm); the fused path adds fc's bias in fp32 inside the norm kernel
    (autocast would round it to bf16 inside the GEMM): the same sum, rounded no worse.
    Fused path only: ``packed`` (n, Ca + Cb) in the GEMM's dtype already holds [a, b] (no
    concatenation); ``out16``, a view of the next layer's ``packed``, receives the result in
    that dtype too."""
    if fused_layers(a.device) and a.dim() == 2 and residual.shape == (a.shape[0], fc.out_features):
        dtype = autocast_dtype(a.device.type) or a.dtype
        res_of = 0 if residual is a else 1 if residual is b else -1
        if packed is not None:
            assert packed.dtype == dtype and packed.shape == (a.shape[0], fc.in_features)
        return _CatLinearResReluNorm.apply(a, b, residual, fc.weight, fc.bias, norm.weight, norm.bias, norm.eps, res_of, dtype, packed, out16)
    return norm(residual + F.relu(fc(cat_for_linear(a, b))))


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
        return token_vectors(self.normed, windows)


def token_vectors(normed: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """(B, k) window ids -> (B, E*k): rows of the (V+1, E) table ``normed``, concatenated."""
    return normed[windows].flatten(1)  # (B, k, E) -> (B, E*k)


class ContextLayer(nn.Module):
    """(context[C], token_vector[E*k]) -> context[C]: LN(context + ReLU(Linear(concat)))."""

    def __init__(self, context_dim: int, token_dim: int, eps: float):
        super().__init__()
        self.fc = nn.Linear(context_dim + token_dim, context_dim)
        self.norm = nn.LayerNorm(context_dim, eps=eps)

    def forward(self, context: torch.Tensor, token_vec: torch.Tensor) -> torch.Tensor:
        return cat_linear_relu_norm(self.fc, context, token_vec, context, self.norm)  # (B, C)


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

    def forward(self, context: torch.Tensor, token: torch.Tensor, packed=None, out16=None) -> torch.Tensor:
        residual = token if self.proj is None else self.proj(token)  # (B, d_out)
        return cat_linear_relu_norm(self.fc, context, token, residual, self.norm, packed, out16)  # (B, d_out)


class TokenBlock(nn.Module):
    """L TokenLayers; layer i reads ContextBlock layer i's output; widths shrink E*k -> E."""

    def __init__(self, cfg: ModelConfig, embed_dim: int):
        super().__init__()
        widths = token_widths(embed_dim, cfg.num_input_tokens, cfg.num_layers)
        self.context_dim = cfg.context_dim
        self.layers = nn.ModuleList(
            TokenLayer(cfg.context_dim, d_in, d_out, cfg.layernorm_eps) for d_in, d_out in zip(widths[:-1], widths[1:])
        )

    def forward(self, contexts, token_vec: torch.Tensor, packed: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(L, B, C) per-layer contexts, (B, E*k) -> (B, E).

        ``packed`` (the captured phase-2 step and validation pass): one (B, C + d_in) buffer per
        layer in the GEMM's dtype, whose first C columns hold that layer's context (contexts
        is then not read). With the fused layers the token vector is cast into the first
        one's other columns and each layer's norm writes its output into the next one's, so
        that no layer concatenates; plain layers read their contexts from it and concatenate."""
        h = token_vec
        if packed is not None and fused_layers(token_vec.device):
            C = self.context_dim
            packed[0][:, C:].copy_(token_vec)
            for i, layer in enumerate(self.layers):
                out16 = packed[i + 1][:, C:] if i + 1 < len(self.layers) else None
                h = layer(packed[i][:, :C], h, packed[i], out16)  # (B, d_{i+1})
            return h
        if packed is not None:  # plain layers: they concatenate anyway
            contexts = [p[:, : self.context_dim] for p in packed]
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
