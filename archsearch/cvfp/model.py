"""The CVFP model (docs/model.md: inputs, ContextBlock, TokenBlock), as plain nn.Modules.

Shapes: B positions in a batch, C context width, E embedding width, k input tokens,
L layers, V vocabulary, d_i the TokenBlock's widths (E*k shrinking to E).

Both blocks are stacks of one layer function, written once in :class:`CatLayer`:

    out = LayerNorm(residual + ReLU(fc(concat(context, x))))

**Column contract.** ``fc``'s input is ``concat(context, x)``, context first: columns
``fc.weight[:, :C]`` multiply the context, ``fc.weight[:, C:]`` the layer's other input. The
fast paths (``cvfp/fast/``) split the weight at C, so they rely on this order.

Every Linear is initialised N(0, init_std) (weights) and N(0, init_bias_std) (biases) from one
explicit generator, in module order (fc, then proj, then norm within a layer), so the slow
reference (reference.py) can draw the same parameters. Nothing here is about speed: the run
(run.py) swaps in fast drop-ins where a module has exactly this form (see docs/engine.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archsearch.config import ModelConfig, token_widths


class TokenEmbedding(nn.Module):
    """The frozen pretrained embedding W (V, E) and the token vectors built from it (§1)."""

    def __init__(self, weight: torch.Tensor, num_input_tokens: int, eps: float = 1e-5):
        super().__init__()
        V, E = weight.shape
        self.vocab_size, self.embed_dim, self.k = V, E, num_input_tokens
        self.register_buffer("weight", weight.detach().float(), persistent=False)  # (V, E), also the tied head
        # embed_norm is a LayerNorm(E) at its initial state (weight 1, bias 0) and is never
        # trained, so LN(W) is a fixed table; row V is the zero vector of "before the stream".
        normed = F.layer_norm(self.weight, (E,), eps=eps)  # (V, E)
        self.register_buffer("normed", torch.cat([normed, normed.new_zeros(1, E)]), persistent=False)  # (V+1, E)

    def windows(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) token ids -> (N, k) ids of tokens t-k+1 .. t, oldest first; V before the start."""
        pad = ids.new_full((self.k - 1,), self.vocab_size)  # (k-1,)
        return torch.cat([pad, ids]).unfold(0, self.k, 1)  # (N, k)

    def vectors(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, k) window ids -> (B, E*k) concatenated normalised embeddings."""
        return token_vectors(self.normed, windows)


def token_vectors(normed: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """(B, k) window ids -> (B, E*k): rows of the (V+1, E) table ``normed``, concatenated."""
    return normed[windows].flatten(1)  # (B, k, E) -> (B, E*k)


class CatLayer(nn.Module):
    """The layer function of both blocks: LN(residual + ReLU(fc([context, x]))).

    Subclasses set ``fc`` (a Linear over C + d_in columns, context first), ``norm`` and say
    what the residual is. A variant (another activation, another residual) is a subclass that
    overrides :meth:`activation` or :meth:`residual`; the run then keeps it on the plain path."""

    context_dim: int
    fc: nn.Linear
    norm: nn.LayerNorm

    def activation(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(z)

    def residual(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, C), (B, d_in) -> (B, d_out)."""
        delta = self.activation(self.fc(torch.cat([context, x], dim=-1)))  # (B, d_out)
        return self.norm(self.residual(context, x) + delta)  # (B, d_out)


class ContextLayer(CatLayer):
    """(context[C], token_vector[E*k]) -> context[C]; the residual is the context (§2)."""

    def __init__(self, context_dim: int, token_dim: int, eps: float):
        super().__init__()
        self.context_dim = context_dim
        self.fc = nn.Linear(context_dim + token_dim, context_dim)  # (C, C + E*k)
        self.norm = nn.LayerNorm(context_dim, eps=eps)

    def residual(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return context  # (B, C)


class ContextBlock(nn.Module):
    """L ContextLayers; every layer sees the same token vector."""

    def __init__(self, cfg: ModelConfig, embed_dim: int):
        super().__init__()
        token_dim = embed_dim * cfg.num_input_tokens
        self.context_dim = cfg.context_dim
        self.layers = nn.ModuleList(ContextLayer(cfg.context_dim, token_dim, cfg.layernorm_eps) for _ in range(cfg.num_layers))

    def forward(self, context: torch.Tensor, token_vec: torch.Tensor, return_all: bool = False):
        """(B, C), (B, E*k) -> (B, C), or the list of the L layer outputs with return_all."""
        outs = []
        for layer in self.layers:
            context = layer(context, token_vec)  # (B, C)
            outs.append(context)
        return outs if return_all else context


class TokenLayer(CatLayer):
    """(context_i[C], token[d_in]) -> token[d_out]; the residual is the token, projected by a
    Linear(d_in -> d_out) where the widths differ (§3)."""

    def __init__(self, context_dim: int, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.context_dim = context_dim
        self.fc = nn.Linear(context_dim + d_in, d_out)  # (d_out, C + d_in)
        self.proj = nn.Linear(d_in, d_out) if d_in != d_out else None  # (d_out, d_in)
        self.norm = nn.LayerNorm(d_out, eps=eps)

    def residual(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x if self.proj is None else self.proj(x)  # (B, d_out)


class TokenBlock(nn.Module):
    """L TokenLayers; layer i reads ContextBlock layer i's output; widths shrink E*k -> E."""

    def __init__(self, cfg: ModelConfig, embed_dim: int):
        super().__init__()
        widths = token_widths(embed_dim, cfg.num_input_tokens, cfg.num_layers)
        self.context_dim = cfg.context_dim
        self.layers = nn.ModuleList(
            TokenLayer(cfg.context_dim, d_in, d_out, cfg.layernorm_eps) for d_in, d_out in zip(widths[:-1], widths[1:])
        )

    def forward(self, contexts, token_vec: torch.Tensor) -> torch.Tensor:
        """(L, B, C) per-layer contexts (or a list of L (B, C)), (B, E*k) -> (B, E)."""
        h = token_vec
        for layer, context in zip(self.layers, contexts):
            h = layer(context, h)  # (B, d_{i+1})
        return h


def tied_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The frozen output head (weight tying, no bias): (B, E) @ (V, E)^T -> (B, V) logits."""
    return h.to(weight.dtype) @ weight.T  # (B, V)


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
