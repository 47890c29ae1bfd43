"""Effective rank of a context matrix (cvfp.md section 6)."""

from __future__ import annotations

import math

import torch


def effective_rank(x: torch.Tensor, max_rows: int, generator: torch.Generator) -> float:
    """exp(entropy of the normalised singular values) of at most ``max_rows`` random rows of
    ``x`` (n, C), without centring, as a fraction of C. Rows are drawn on the CPU generator."""
    n, c = x.shape
    if n > max_rows:
        rows = torch.randperm(n, generator=generator)[:max_rows]
        x = x[rows.to(x.device)]
    s = torch.linalg.svdvals(x.float())  # (min(n, C),)
    total = s.sum()
    if not torch.isfinite(total) or total <= 0:
        return math.nan
    p = s / total
    er = torch.exp(-(p * torch.log(p + 1e-10)).sum())
    return float(er) / c
