"""Drawing (matplotlib, Agg). The numbers come from data functions elsewhere; these only draw."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np


class ScalingSeries(NamedTuple):
    """One config's points and fitted law, ready to draw."""

    label: str
    tokens: Sequence[float]
    ppl: Sequence[float]
    alpha: float | None = None
    A: float | None = None
    alpha_low: float | None = None
    alpha_high: float | None = None
    loo_alphas: Sequence[float] = ()
    loo_intercepts: Sequence[float] = ()


def _figure(figsize=(6.4, 4.4)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=110)


def band(series: ScalingSeries, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Jackknife band of the fitted law: the spread of the leave-one-out fits' ln PPL."""
    if len(series.loo_alphas) < 3:
        return None
    from scipy import stats

    a = np.asarray(series.loo_alphas)[:, None]
    b = np.asarray(series.loo_intercepts)[:, None]
    loo = b + a * np.log(x)[None, :]  # (n, len(x))
    n = loo.shape[0]
    se = np.sqrt((n - 1) / n * ((loo - loo.mean(0)) ** 2).sum(0))
    centre = math.log(series.A) + series.alpha * np.log(x)
    half = stats.t.ppf(0.975, n - 1) * se
    return np.exp(centre - half), np.exp(centre + half)


def plot_scaling(series: Sequence[ScalingSeries], path: str | Path, title: str = "PPL vs training tokens") -> Path:
    """Log-log PPL vs tokens with each config's fitted line and interval band."""
    fig, ax = _figure()
    colors = [f"C{i}" for i in range(10)]
    lo = min(min(s.tokens) for s in series if len(s.tokens))
    hi = max(max(s.tokens) for s in series if len(s.tokens))
    x = np.geomspace(lo / 1.3, hi * 1.3, 100)
    for i, s in enumerate(series):
        c = colors[i % len(colors)]
        label = s.label if s.alpha is None else f"{s.label} (α = {s.alpha:.3f})"
        ax.plot(s.tokens, s.ppl, "o", color=c, label=label)
        if s.alpha is not None:
            ax.plot(x, s.A * x**s.alpha, "-", color=c, lw=1.2)
            b = band(s, x)
            if b is not None:
                ax.fill_between(x, b[0], b[1], color=c, alpha=0.12, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation PPL")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def save(fig, path: str | Path) -> Path:
    """Lay out, write and close a figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
