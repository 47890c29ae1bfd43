"""The scaling law PPL = A * tokens^alpha (cvfp.md 9): fit, interval, extrapolation.

Pure numpy/scipy. ``alpha`` is the OLS slope of ln PPL on ln tokens, ``A = exp(intercept)``,
``R^2`` the squared correlation (NaN where every PPL is the same: nothing varies, so nothing
is explained), ``alpha_se`` the slope's OLS standard error.

The interval is a **leave-one-out (jackknife) interval over sizes**: the fit is repeated
with each size left out, the jackknife standard error
``sqrt((n-1)/n * sum_i (alpha_(i) - mean)^2)`` is taken of those slopes, and the interval is
``alpha +- t_{n-1} * se``. It needs at least three sizes (with two the interval is NaN).
It asks how much alpha depends on any single size, which is the question a reader of a
4-size grid has; with so few points it is wide, and the report says so.
The extrapolated PPL at a target token count gets the same jackknife interval on ln PPL.

**Measured noise combined.** Each size's ln PPL is its mean validation loss, so its standard
error is the run's ``val_loss_se`` (std of the per-token losses / sqrt(M), with replicate
seeds folded in). When the fit is given these (``ln_se``), the OLS slope and the
extrapolated ln PPL, being linear in the ln PPLs (weights ``w_i``), get the measurement
variance ``sum_i w_i^2 se_i^2``; it is added to the jackknife variance and the interval is
``t_{n-1} * sqrt(se_jack^2 + se_meas^2)``. The jackknife measures how much the fit leans on
any one size (curvature, an odd size); the measurement term what the finite validation
stream leaves uncertain at every size at once. Adding them counts the noise the jackknife
already sees once more: the interval errs on the wide side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from archsearch.errors import FitError

CI_METHOD = "jackknife (leave-one-out over sizes), Student t with n-1 dof"
CI_METHOD_COMBINED = CI_METHOD + ", plus the per-size standard errors of ln PPL propagated through the fit"


@dataclass(frozen=True)
class Extrapolation:
    target_tokens: float
    ppl: float
    low: float
    high: float


@dataclass(frozen=True)
class ScalingFit:
    alpha: float
    A: float
    intercept: float
    r2: float
    alpha_se: float
    """OLS standard error of the slope (NaN with two sizes)."""
    alpha_low: float
    alpha_high: float
    """Jackknife interval for alpha at ``level`` (NaN with fewer than three sizes)."""
    level: float
    tokens: tuple[float, ...]
    ppl: tuple[float, ...]
    loo_alphas: tuple[float, ...] = field(default=())
    loo_intercepts: tuple[float, ...] = field(default=())
    ci_method: str = CI_METHOD
    ln_se: tuple[float, ...] = field(default=())
    """Per-size standard errors of ln PPL (empty: not measured, jackknife alone)."""
    alpha_se_jackknife: float = math.nan
    alpha_se_measured: float = math.nan
    """The two parts of the interval's standard error (NaN where not available)."""

    @property
    def n(self) -> int:
        return len(self.tokens)

    def predict(self, tokens: float) -> float:
        """PPL predicted by the fitted law at ``tokens``."""
        return self.A * float(tokens) ** self.alpha

    def ppl_factor_per_decade(self) -> float:
        """How PPL is multiplied by 10x more tokens: 10^alpha."""
        return 10.0**self.alpha

    def extrapolate(self, target_tokens: float) -> Extrapolation:
        """PPL at ``target_tokens`` with its jackknife interval (NaN bounds with < 3 sizes)."""
        if not (math.isfinite(target_tokens) and target_tokens > 0):
            raise FitError(f"target tokens must be a positive number, got {target_tokens!r}")
        x = math.log(target_tokens)
        centre = self.intercept + self.alpha * x
        low = high = math.nan
        if len(self.loo_alphas) >= 3:
            loo = np.asarray(self.loo_intercepts) + np.asarray(self.loo_alphas) * x
            se = math.hypot(_jackknife_se(loo), self.measured_se(prediction_weights(np.log(self.tokens), x)))
            half = _t(self.level, len(loo)) * se
            low, high = math.exp(centre - half), math.exp(centre + half)
        return Extrapolation(float(target_tokens), math.exp(centre), low, high)

    def measured_se(self, weights: np.ndarray) -> float:
        """Standard error of ``sum_i weights_i * ln PPL_i`` from the per-size standard errors
        (0 when they were not given)."""
        if not self.ln_se:
            return 0.0
        return math.sqrt(float(((np.asarray(weights) * np.asarray(self.ln_se)) ** 2).sum()))

    def to_dict(self, target_tokens: float | None = None) -> dict:
        d = {
            "alpha": self.alpha,
            "A": self.A,
            "r2": self.r2,
            "alpha_se": self.alpha_se,
            "alpha_low": self.alpha_low,
            "alpha_high": self.alpha_high,
            "level": self.level,
            "ci_method": self.ci_method,
            "n_sizes": self.n,
            "intercept": self.intercept,
            "loo_alphas": list(self.loo_alphas),
            "loo_intercepts": list(self.loo_intercepts),
            "ln_se": list(self.ln_se),
            "alpha_se_jackknife": self.alpha_se_jackknife,
            "alpha_se_measured": self.alpha_se_measured,
        }
        if target_tokens is not None:
            ex = self.extrapolate(target_tokens)
            d.update(target_tokens=ex.target_tokens, ppl_at_target=ex.ppl, ppl_at_target_low=ex.low, ppl_at_target_high=ex.high)
        return d


def _jackknife_se(values: np.ndarray) -> float:
    n = len(values)
    return math.sqrt((n - 1) / n * float(((values - values.mean()) ** 2).sum()))


def _t(level: float, n: int) -> float:
    # imported here: scipy.stats takes ~1 s to import, and `archsearch run` imports this module
    # (through the trial plan) before Ray starts, while the first fit comes only after a trial
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, n - 1))


def slope_weights(x: np.ndarray) -> np.ndarray:
    """w with OLS slope = sum_i w_i y_i."""
    d = x - x.mean()
    return d / float((d**2).sum())


def prediction_weights(x: np.ndarray, x0: float) -> np.ndarray:
    """c with the OLS prediction at x0 = sum_i c_i y_i."""
    return 1.0 / len(x) + (x0 - x.mean()) * slope_weights(x)


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """slope, intercept, r^2, slope standard error."""
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    sxy = float(((x - xm) * (y - ym)).sum())
    syy = float(((y - ym) ** 2).sum())
    slope = sxy / sxx
    intercept = ym - slope * xm
    r2 = sxy * sxy / (sxx * syy) if syy > 0 else math.nan  # equal PPLs: no variance to explain, R^2 undefined
    n = len(x)
    if n > 2:
        resid = y - (intercept + slope * x)
        se = math.sqrt(float((resid**2).sum()) / (n - 2) / sxx)
    else:
        se = math.nan
    return slope, float(intercept), r2, se


def check_points(tokens: Sequence[float], ppl: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Validate fit input; raise FitError naming every problem."""
    t = np.asarray(tokens, dtype=float).ravel()
    p = np.asarray(ppl, dtype=float).ravel()
    problems = []
    if t.shape != p.shape:
        problems.append(f"{len(t)} token counts but {len(p)} PPL values")
    else:
        if len(t) < 2:
            problems.append(f"a fit needs at least two sizes, got {len(t)}")
        for name, arr in (("tokens", t), ("ppl", p)):
            bad = [f"{v:g}" for v in arr if not (math.isfinite(v) and v > 0)]
            if bad:
                problems.append(f"{name} must be positive and finite, got {', '.join(bad)}")
        uniq, counts = np.unique(t, return_counts=True)
        dup = [f"{v:g}" for v, c in zip(uniq, counts) if c > 1]
        if dup:
            problems.append(f"duplicate sizes: {', '.join(dup)} (average replicates before fitting)")
    if problems:
        raise FitError("cannot fit the scaling law: " + "; ".join(problems))
    return t, p


def fit_power_law(tokens: Sequence[float], ppl: Sequence[float], level: float = 0.95,
                  ln_se: Sequence[float | None] | None = None) -> ScalingFit:  # fmt: skip
    """Fit PPL = A * tokens^alpha by OLS of ln PPL on ln tokens.

    ``ln_se``: per-size standard errors of ln PPL (a run's ``val_loss_se``); given for every
    size, they widen the jackknife interval (module docstring). A missing one (None, NaN:
    a record from before they were measured) leaves the jackknife alone."""
    if not 0 < level < 1:
        raise FitError(f"confidence level must lie in (0, 1), got {level}")
    t, p = check_points(tokens, ppl)
    order = np.argsort(t)
    t, p = t[order], p[order]
    se_in: tuple[float, ...] = ()
    if ln_se is not None and len(ln_se) == len(t) and all(v is not None and math.isfinite(v) and v >= 0 for v in ln_se):
        se_in = tuple(float(np.asarray(ln_se, dtype=float)[i]) for i in order)
    x, y = np.log(t), np.log(p)
    slope, intercept, r2, se = _ols(x, y)
    loo_a: list[float] = []
    loo_b: list[float] = []
    low = high = math.nan
    if len(x) >= 3:
        for i in range(len(x)):
            keep = np.arange(len(x)) != i
            a_i, b_i, _, _ = _ols(x[keep], y[keep])
            loo_a.append(a_i)
            loo_b.append(b_i)
    se_jack = _jackknife_se(np.asarray(loo_a)) if loo_a else math.nan
    se_meas = math.sqrt(float(((slope_weights(x) * np.asarray(se_in)) ** 2).sum())) if se_in else math.nan
    if loo_a:
        half = _t(level, len(x)) * (math.hypot(se_jack, se_meas) if se_in else se_jack)
        low, high = slope - half, slope + half
    return ScalingFit(
        alpha=slope,
        A=math.exp(intercept),
        intercept=intercept,
        r2=r2,
        alpha_se=se,
        alpha_low=low,
        alpha_high=high,
        level=level,
        tokens=tuple(float(v) for v in t),
        ppl=tuple(float(v) for v in p),
        loo_alphas=tuple(loo_a),
        loo_intercepts=tuple(loo_b),
        ci_method=CI_METHOD_COMBINED if se_in else CI_METHOD,
        ln_se=se_in,
        alpha_se_jackknife=se_jack,
        alpha_se_measured=se_meas,
    )
