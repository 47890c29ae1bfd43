"""Effective ranks from the Gram matrix's eigenvalues agree with an SVD (the oracle) to 1e-4."""

import math

import pytest
import torch

from archsearch.cvfp.metrics import effective_rank, singular_values
from archsearch.cvfp.reference import Reference
from archsearch.cvfp.run import train_run
from test_engine import tiny_cfg, tiny_data


def oracle(x: torch.Tensor, max_rows: int, seed: int) -> float:
    """reference.py's effective rank, computed by an SVD in float64 on the same rows."""
    return Reference.effective_rank(x.double(), max_rows, torch.Generator().manual_seed(seed))


def with_spectrum(n: int, c: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """An (n, c) matrix with singular values ``s`` (len min(n, c)) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(c, len(s), generator=g, dtype=torch.float64))
    return (u * s) @ v.T


def inputs():
    g = torch.Generator().manual_seed(0)
    yield "gaussian", torch.randn(500, 64, generator=g)
    yield "wide (n < C)", torch.randn(40, 96, generator=g)
    yield "uncentred (one dominant direction)", torch.randn(600, 48, generator=g) + 5.0
    yield "rank 5 of 64", torch.randn(400, 5, generator=g) @ torch.randn(5, 64, generator=g)
    yield "rank 5 + 1e-6 noise", torch.randn(400, 5, generator=g) @ torch.randn(5, 64, generator=g) + 1e-6 * torch.randn(400, 64, generator=g)
    yield "condition 1e6", with_spectrum(300, 64, torch.logspace(0, -6, 64, dtype=torch.float64), 1).float()
    yield "condition 1e12 (float64)", with_spectrum(300, 64, torch.logspace(0, -12, 64, dtype=torch.float64), 2)
    yield "one column", torch.randn(50, 1, generator=g)
    yield "one row", torch.randn(1, 16, generator=g)


@pytest.mark.parametrize("name,x", list(inputs()), ids=[n for n, _ in inputs()])
@pytest.mark.parametrize("max_rows", [10_000, 32])
def test_effective_rank_matches_svd(name, x, max_rows):
    got = effective_rank(x, max_rows, torch.Generator().manual_seed(7))
    want = oracle(x, max_rows, 7)
    assert got == pytest.approx(want, abs=1e-4), name


def test_singular_values_match_svdvals_where_they_carry_weight():
    x = with_spectrum(200, 32, torch.logspace(2, -3, 32, dtype=torch.float64), 3)
    s, ref = singular_values(x), torch.linalg.svdvals(x)
    assert s.shape == ref.shape and s.dtype == torch.float64
    assert torch.allclose(s, ref, rtol=1e-8, atol=1e-9 * float(ref[0]))
    wide = torch.randn(5, 20, dtype=torch.float64)
    assert torch.allclose(singular_values(wide), torch.linalg.svdvals(wide), rtol=1e-9)


def test_zero_and_nonfinite_inputs_give_nan():
    assert math.isnan(effective_rank(torch.zeros(10, 4), 100, torch.Generator()))
    bad = torch.randn(10, 4)
    bad[3, 1] = float("nan")
    assert math.isnan(effective_rank(bad, 100, torch.Generator()))


def test_effective_rank_of_real_contexts_matches_svd():
    """The contexts and validation cache of a real (tiny) run: LayerNorm'd, uncentred."""
    W, train, val = tiny_data(4, N=120, M=60)
    cfg = tiny_cfg(2, 2)
    r = train_run(cfg, W, train, val, seed=1, keep_tensors=True)
    for x in (r.tensors["contexts"], r.tensors["val_cache"][-1], r.tensors["train_cache"][0]):
        for max_rows in (30, 10_000):
            assert effective_rank(x, max_rows, torch.Generator().manual_seed(1)) == pytest.approx(oracle(x, max_rows, 1), abs=1e-4)
