"""The scaling fit reproduces the report's alpha and R^2 and equals scipy's linregress."""

import math

import numpy as np
import pytest
from scipy import stats

from archsearch.errors import FitError
from archsearch.scaling import fit_power_law

TOKENS = [62891, 122795, 240132, 587970]
# the report's per-size PPLs (rounded to 0.1) and its alpha / R^2
REPORT = {
    "baseline": ([751.4, 489.8, 364.6, 249.3], -0.4860, 0.9895),
    "input_tokens_2": ([587.0, 400.2, 329.3, 198.1], -0.4702, 0.9870),
    "context_dim_1152": ([756.0, 514.9, 367.3, 246.9], -0.4988, 0.9963),
    "layers_9": ([768.5, 505.4, 381.6, 256.8], -0.4818, 0.9915),
}


@pytest.mark.parametrize("name", list(REPORT))
def test_reproduces_report_alpha_and_r2(name):
    ppl, alpha, r2 = REPORT[name]
    fit = fit_power_law(TOKENS, ppl)
    assert abs(fit.alpha - alpha) <= 0.0002
    assert abs(fit.r2 - r2) <= 0.0002


@pytest.mark.parametrize("name", list(REPORT))
def test_equals_linregress(name):
    ppl = REPORT[name][0]
    fit = fit_power_law(TOKENS, ppl)
    lr = stats.linregress(np.log(TOKENS), np.log(ppl))
    assert fit.alpha == pytest.approx(lr.slope, abs=1e-9)
    assert math.log(fit.A) == pytest.approx(lr.intercept, abs=1e-9)
    assert fit.r2 == pytest.approx(lr.rvalue**2, abs=1e-9)
    assert fit.alpha_se == pytest.approx(lr.stderr, abs=1e-9)


def test_interval_is_the_jackknife_over_sizes():
    ppl = REPORT["baseline"][0]
    fit = fit_power_law(TOKENS, ppl)
    loo = []
    for i in range(4):
        keep = [j for j in range(4) if j != i]
        loo.append(stats.linregress(np.log(np.take(TOKENS, keep)), np.log(np.take(ppl, keep))).slope)
    loo = np.array(loo)
    se = math.sqrt(3 / 4 * ((loo - loo.mean()) ** 2).sum())
    half = stats.t.ppf(0.975, 3) * se
    assert fit.alpha_low == pytest.approx(fit.alpha - half)
    assert fit.alpha_high == pytest.approx(fit.alpha + half)
    assert fit.alpha_low < fit.alpha < fit.alpha_high


def test_exact_power_law_is_recovered_and_extrapolated():
    t = np.array([1e3, 3e3, 1e4, 5e4])
    fit = fit_power_law(t, 900 * t**-0.3)
    assert fit.alpha == pytest.approx(-0.3)
    assert fit.A == pytest.approx(900)
    assert fit.r2 == pytest.approx(1.0)
    ex = fit.extrapolate(1e7)
    assert ex.ppl == pytest.approx(900 * 1e7**-0.3)
    assert ex.low == pytest.approx(ex.ppl) and ex.high == pytest.approx(ex.ppl)  # no scatter, no width


def test_report_alpha_interpretation_numbers():
    # "alpha = -0.49: 10x tokens -> PPL x 0.32; -0.47 -> x 0.34; gap ~6% at 1M, ~13% at 10M"
    assert 10**-0.49 == pytest.approx(0.32, abs=0.005)
    assert 10**-0.47 == pytest.approx(0.34, abs=0.005)


def test_two_sizes_fit_without_interval():
    fit = fit_power_law([1000, 4000], [100, 50])
    assert fit.alpha == pytest.approx(math.log(0.5) / math.log(4))
    assert math.isnan(fit.alpha_low) and math.isnan(fit.alpha_se)
    assert math.isnan(fit.extrapolate(1e6).low)


@pytest.mark.parametrize(
    "tokens, ppl, message",
    [
        ([1000], [10], "at least two sizes"),
        ([1000, 2000], [10, -1], "ppl must be positive"),
        ([0, 2000], [10, 5], "tokens must be positive"),
        ([1000, 1000, 2000], [10, 9, 5], "duplicate sizes"),
        ([1000, 2000], [10, float("nan")], "ppl must be positive"),
        ([1000, 2000, 3000], [10, 5], "3 token counts but 2"),
    ],
)
def test_invalid_input_is_a_clear_error(tokens, ppl, message):
    with pytest.raises(FitError, match=message):
        fit_power_law(tokens, ppl)


def test_measured_standard_errors_widen_the_interval_as_documented():
    """Direct computation: slope and extrapolation are linear in ln PPL, so the measurement
    variance is sum w_i^2 se_i^2; it adds to the jackknife variance under the same t."""
    ppl = REPORT["baseline"][0]
    se = [0.02, 0.015, 0.03, 0.01]
    plain, fit = fit_power_law(TOKENS, ppl), fit_power_law(TOKENS, ppl, ln_se=se)
    assert fit.alpha == plain.alpha and fit.A == plain.A
    x = np.log(TOKENS)
    w = (x - x.mean()) / ((x - x.mean()) ** 2).sum()
    meas = math.sqrt(sum((wi * si) ** 2 for wi, si in zip(w, se)))
    jack = (plain.alpha - plain.alpha_low) / stats.t.ppf(0.975, 3)
    half = stats.t.ppf(0.975, 3) * math.sqrt(jack**2 + meas**2)
    assert fit.alpha_se_measured == pytest.approx(meas)
    assert fit.alpha_high - fit.alpha == pytest.approx(half)
    assert fit.alpha_low < plain.alpha_low and "standard errors" in fit.ci_method
    # the extrapolation at 1e7 tokens: c_i = 1/n + (x0 - mean x) w_i
    x0 = math.log(1e7)
    c = 1 / 4 + (x0 - x.mean()) * w
    meas_p = math.sqrt(sum((ci * si) ** 2 for ci, si in zip(c, se)))
    ex, ex0 = fit.extrapolate(1e7), plain.extrapolate(1e7)
    jack_p = math.log(ex0.high / ex0.ppl) / stats.t.ppf(0.975, 3)
    assert math.log(ex.high / ex.ppl) == pytest.approx(stats.t.ppf(0.975, 3) * math.hypot(jack_p, meas_p))


def test_measured_term_matches_a_simulation_of_the_noise():
    """The propagated variance equals the spread of slopes refitted on noisy ln PPLs."""
    t = np.array([1e3, 3e3, 1e4, 5e4])
    se = np.array([0.05, 0.04, 0.03, 0.02])
    fit = fit_power_law(t, 900 * t**-0.3, ln_se=se)
    rng = np.random.default_rng(0)
    y = np.log(900 * t**-0.3) + rng.normal(size=(20000, 4)) * se
    slopes = np.polyfit(np.log(t), y.T, 1)[0]
    assert fit.alpha_se_measured == pytest.approx(slopes.std(), rel=0.03)
    # an exact law has no jackknife width: the interval is the measurement term alone
    assert fit.alpha_high - fit.alpha == pytest.approx(stats.t.ppf(0.975, 3) * fit.alpha_se_measured)


def test_missing_standard_errors_leave_the_jackknife_alone():
    ppl = REPORT["baseline"][0]
    fit = fit_power_law(TOKENS, ppl, ln_se=[0.02, None, 0.03, 0.01])
    assert fit.alpha_low == fit_power_law(TOKENS, ppl).alpha_low and fit.ln_se == ()


def test_equal_ppls_give_a_flat_law_and_no_r2():
    """Every size at the same PPL: alpha 0 and nothing varies, so R^2 is undefined (NaN), not
    a perfect 1; the report flags the interval that contains 0."""
    from archsearch.report.data import ConfigResult, SizeRow, build_report

    fit = fit_power_law([1000, 2000, 4000], [100.0, 100.0, 100.0], ln_se=[0.05] * 3)
    assert fit.alpha == pytest.approx(0.0, abs=1e-12) and math.isnan(fit.r2)
    assert fit.alpha_low < 0 < fit.alpha_high  # the measured errors give it a width
    rep = build_report([ConfigResult("flat", {}, 1000, [SizeRow(t, 100.0, val_loss_se=0.05) for t in (1000, 2000, 4000)])])
    assert "α∋0" in rep.summary[0].flags and rep.to_dict()["summary"][0]["r2"] is None
