"""Effective rank of a context matrix (cvfp.md section 6)."""

from __future__ import annotations

import math

import torch


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """The singular values of ``x`` (n, C) (float64, C values, descending), without an SVD.

    They are the square roots of the eigenvalues of the (C, C) Gram matrix xᵀx, formed and
    decomposed in float64 on x's device (eigvalsh: one symmetric eigenproblem of size C, where
    svdvals iterates on the (n, C) matrix itself). Eigenvalues that rounding makes slightly
    negative (a rank-deficient x, n < C) are clamped to 0. Forming the Gram squares the
    condition number, so a singular value below ~1e-8 of the largest is lost to rounding: its
    share of the sum, and so of the effective rank, is below 1e-8 too."""
    x64 = x.to(torch.float64)
    gram = x64.T @ x64 if x64.shape[0] >= x64.shape[1] else x64 @ x64.T  # the smaller side: (min, min)
    if not bool(torch.isfinite(gram).all()):  # eigvalsh fails on NaN/inf: the ER is then NaN
        return torch.full((min(x.shape),), math.nan, dtype=torch.float64, device=x.device)
    ev = torch.linalg.eigvalsh(gram)  # ascending
    return ev.clamp_min(0).sqrt().flip(0)


def effective_rank(x: torch.Tensor, max_rows: int, generator: torch.Generator) -> float:
    """exp(entropy of the normalised singular values) of at most ``max_rows`` random rows of
    ``x`` (n, C), without centring, as a fraction of C. Rows are drawn on the CPU generator.
    The singular values come from the Gram matrix (:func:`singular_values`); the result agrees
    with an SVD (reference.py's oracle) to 1e-4 (tests/test_metrics.py)."""
    n, c = x.shape
    if n > max_rows:
        rows = torch.randperm(n, generator=generator)[:max_rows]
        x = x[rows.to(x.device)]
    s = singular_values(x)
    total = s.sum()
    if not torch.isfinite(total) or total <= 0:
        return math.nan
    p = s / total
    er = torch.exp(-(p * torch.log(p + 1e-10)).sum())
    return float(er) / c
