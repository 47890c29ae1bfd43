"""The numbers of a report, computed from per-config results (pure: no Optuna, no Ray, no I/O).

A report is what a researcher writes after a grid: a summary table, the settings, per-config
tables per size, the fitted law with its interval, what the alpha differences mean in PPL,
rankings and a recommendation stated with its uncertainty. :func:`build_report` computes all
of it from :class:`ConfigResult` records (from a study, or from published numbers); the
renderers in ``render.py`` only format and draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from archsearch.scaling import ScalingFit, fit_power_law

GAP_TOKENS = (1_000_000, 10_000_000)
"""Token counts at which the PPL gap between configs is stated."""


@dataclass
class SizeRow:
    tokens: int
    ppl: float
    acc: float | None = None
    val_er: float | None = None
    samples: int | None = None
    train_er: float | None = None
    phase1_iterations: float | None = None


@dataclass
class ConfigResult:
    name: str
    params: dict[str, Any]
    phase1_params: int | None
    sizes: list[SizeRow]
    embed_dim: int | None = None
    phase2_params: int | None = None
    state: str = "COMPLETE"
    number: int | None = None
    values: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    family: str = "cvfp"
    total_params: int | None = None


@dataclass
class Law:
    alpha: float
    A: float
    r2: float
    alpha_se: float
    alpha_low: float
    alpha_high: float
    factor_per_10x: float
    """10^alpha: what 10x more tokens multiplies PPL by."""
    ppl_at: dict[int, float]
    loo_alphas: list[float] = field(default_factory=list)
    loo_intercepts: list[float] = field(default_factory=list)
    """The leave-one-out fits behind the interval (for the plots' bands)."""


@dataclass
class SummaryRow:
    config: str
    phase1_params: int | None
    alpha: float | None
    r2: float | None
    best_ppl: float
    best_acc: float | None
    val_er: float | None
    """Validation ER at the size with the best PPL (the largest, normally)."""


@dataclass
class Gap:
    a: str
    b: str
    d_alpha: float
    """alpha_a - alpha_b."""
    fitted: dict[int, float]
    """PPL_a / PPL_b - 1 at each GAP_TOKENS count, from the two fitted laws."""
    alpha_only: dict[int, float]
    """(T / anchor)^|d_alpha| - 1: the gap alpha alone opens from equal PPL at ``anchor``."""
    anchor_tokens: int


@dataclass
class Report:
    title: str
    summary: list[SummaryRow]
    settings: list[dict[str, Any]]
    configs: list[ConfigResult]
    laws: dict[str, Law]
    gaps: list[Gap]
    rankings: dict[str, list[dict[str, Any]]]
    recommendation: list[str]
    overlaps: list[tuple[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)
    families: list[dict[str, Any]] = field(default_factory=list)
    """Per config, family by family: parameters, alpha with its interval, R^2, best PPL
    (empty when every config is CVFP)."""
    matched: list[dict[str, Any]] = field(default_factory=list)
    """Configs of different families at matched parameter counts, side by side."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overlaps"] = [list(p) for p in self.overlaps]
        return _finite(d)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def law_of(cfg: ConfigResult) -> tuple[Law, ScalingFit] | None:
    if len(cfg.sizes) < 2:
        return None
    fit = fit_power_law([s.tokens for s in cfg.sizes], [s.ppl for s in cfg.sizes])
    law = Law(fit.alpha, fit.A, fit.r2, fit.alpha_se, fit.alpha_low, fit.alpha_high, fit.ppl_factor_per_decade(),
              {t: fit.predict(t) for t in GAP_TOKENS}, list(fit.loo_alphas), list(fit.loo_intercepts))  # fmt: skip
    return law, fit


def alpha_gap(alpha_a: float, alpha_b: float, tokens: float, anchor: float) -> float:
    """Relative PPL gap that a slope difference alone opens between two laws that agree at
    ``anchor`` tokens: (tokens / anchor)^|alpha_a - alpha_b| - 1."""
    return (tokens / anchor) ** abs(alpha_a - alpha_b) - 1


def median_size(configs: Sequence[ConfigResult]) -> int:
    """The study's median training size (the lower one of an even count): the anchor of the
    alpha-only gaps, i.e. "if two configs were equal where we measured, ..."."""
    sizes = sorted({s.tokens for c in configs for s in c.sizes})
    return sizes[(len(sizes) - 1) // 2]


def intervals_overlap(a: Law, b: Law) -> bool:
    if any(math.isnan(x) for x in (a.alpha_low, a.alpha_high, b.alpha_low, b.alpha_high)):
        return True  # no interval (two sizes): nothing is resolved
    return a.alpha_low <= b.alpha_high and b.alpha_low <= a.alpha_high


def build_report(configs: Sequence[ConfigResult], title: str = "Architecture comparison", meta: dict | None = None,
                 top: int | None = None, direction: str = "minimize") -> Report:  # fmt: skip
    """Every number of the report. ``top`` keeps the best ``top`` configs by alpha (searches)."""
    configs = [c for c in configs if c.sizes]
    fits = {c.name: law_of(c) for c in configs}
    laws = {n: lf[0] for n, lf in fits.items() if lf is not None}
    if top is not None:
        ranked = sorted(configs, key=lambda c: laws[c.name].alpha if c.name in laws else math.inf)
        configs = ranked[:top]
        laws = {c.name: laws[c.name] for c in configs if c.name in laws}
    summary = []
    for c in configs:
        best = min(c.sizes, key=lambda s: s.ppl)
        law = laws.get(c.name)
        summary.append(SummaryRow(c.name, c.phase1_params, law.alpha if law else None, law.r2 if law else None, best.ppl,
                                  max((s.acc for s in c.sizes if s.acc is not None), default=None), best.val_er))  # fmt: skip
    settings = [{"config": c.name, **{k: c.params.get(k) for k in ("num_layers", "context_dim", "num_input_tokens")},
                 "embed_dim": c.embed_dim, **{k: v for k, v in c.params.items() if "." in k}} for c in configs]  # fmt: skip

    with_law = [c for c in configs if c.name in laws]
    by_alpha = sorted(with_law, key=lambda c: laws[c.name].alpha)
    by_ppl = sorted(configs, key=lambda c: min(s.ppl for s in c.sizes))
    rankings: dict[str, list[dict[str, Any]]] = {
        "best_ppl": [{"config": c.name, "ppl": min(s.ppl for s in c.sizes)} for c in by_ppl],
        "best_alpha": [{"config": c.name, "alpha": laws[c.name].alpha, "alpha_low": laws[c.name].alpha_low,
                        "alpha_high": laws[c.name].alpha_high} for c in by_alpha],  # fmt: skip
    }
    rankings["ppl_per_parameter"] = _ppl_per_parameter(configs)

    anchor = median_size(configs) if configs else 1
    gaps = []
    if len(by_alpha) >= 2:
        pairs = [(by_alpha[0], by_alpha[-1])]
        if by_ppl and by_ppl[0].name in laws and by_ppl[0].name != by_alpha[0].name:
            pairs.insert(0, (by_alpha[0], by_ppl[0]))
        for a, b in pairs:
            la, lb = laws[a.name], laws[b.name]
            gaps.append(Gap(a.name, b.name, la.alpha - lb.alpha,
                            {t: la.ppl_at[t] / lb.ppl_at[t] - 1 for t in GAP_TOKENS},
                            {t: alpha_gap(la.alpha, lb.alpha, t, anchor) for t in GAP_TOKENS}, anchor))  # fmt: skip

    overlaps = [(a.name, b.name) for i, a in enumerate(by_alpha) for b in by_alpha[i + 1 :] if intervals_overlap(laws[a.name], laws[b.name])]
    recommendation = _recommend(by_ppl, by_alpha, laws, overlaps, rankings)
    families, matched = family_tables(configs, laws)
    return Report(title, summary, settings, list(configs), laws, gaps, rankings, recommendation, overlaps, dict(meta or {}),
                  families, matched)  # fmt: skip


MATCH_TOLERANCE = 0.05
"""Two configs of different families are "matched" when their trainable parameter counts
differ by at most this fraction of the larger one."""


def family_tables(configs: Sequence[ConfigResult], laws: dict[str, Law]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-family rows (sorted by family, then parameters) and the matched-parameter pairs.

    Both are empty when every config is CVFP, so a CVFP-only report reads as it always did."""
    if all(c.family == "cvfp" for c in configs):
        return [], []
    rows = []
    for c in configs:
        law = laws.get(c.name)
        best = min(c.sizes, key=lambda s: s.ppl)
        rows.append({
            "family": c.family, "config": c.name, "total_params": c.total_params,
            "alpha": law.alpha if law else None, "alpha_low": law.alpha_low if law else None,
            "alpha_high": law.alpha_high if law else None, "r2": law.r2 if law else None,
            "best_ppl": best.ppl, "best_tokens": best.tokens,
        })  # fmt: skip
    rows.sort(key=lambda r: (r["family"], r["total_params"] or 0, r["config"]))
    matched = []
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            if a["family"] == b["family"] or not a["total_params"] or not b["total_params"]:
                continue
            rel = abs(a["total_params"] - b["total_params"]) / max(a["total_params"], b["total_params"])
            if rel > MATCH_TOLERANCE:
                continue
            la, lb = laws.get(a["config"]), laws.get(b["config"])
            matched.append({
                "a": a, "b": b, "params_rel_diff": rel,
                "d_alpha": la.alpha - lb.alpha if la and lb else None,
                "alpha_overlap": intervals_overlap(la, lb) if la and lb else None,
                "ppl_ratio": a["best_ppl"] / b["best_ppl"],
            })  # fmt: skip
    matched.sort(key=lambda m: m["a"]["total_params"])
    return rows, matched


def _ppl_per_parameter(configs: Sequence[ConfigResult]) -> list[dict[str, Any]]:
    """PPL gained per extra million phase-1 parameters over the smallest config (at each
    config's best PPL). The smallest config is the reference (no value); configs that are
    worse than it get a negative number."""
    counted = [c for c in configs if c.phase1_params]
    if len(counted) < 2:
        return []
    ref = min(counted, key=lambda c: (c.phase1_params, min(s.ppl for s in c.sizes)))
    ref_ppl = min(s.ppl for s in ref.sizes)
    rows = []
    for c in counted:
        if c is ref:
            continue
        extra = (c.phase1_params - ref.phase1_params) / 1e6
        gain = ref_ppl - min(s.ppl for s in c.sizes)
        rows.append({"config": c.name, "ppl_gain_per_extra_mparam": gain / extra if extra > 0 else (math.inf if gain > 0 else -math.inf),
                     "extra_mparams": extra, "ppl_gain": gain, "reference": ref.name})  # fmt: skip
    rows.sort(key=lambda r: -r["ppl_gain_per_extra_mparam"])
    return rows


def _recommend(by_ppl, by_alpha, laws, overlaps, rankings) -> list[str]:
    out = []
    if by_ppl:
        b = by_ppl[0]
        out.append(f"Best absolute PPL: {b.name} ({min(s.ppl for s in b.sizes):.1f} at {max(s.tokens for s in b.sizes):,} tokens).")
    if by_alpha:
        a = by_alpha[0]
        la = laws[a.name]
        text = f"Best data efficiency (most negative alpha): {a.name} (alpha = {la.alpha:.4f}, 95% interval [{la.alpha_low:.4f}, {la.alpha_high:.4f}])."
        rivals = [y if x == a.name else x for x, y in overlaps if a.name in (x, y)]
        if rivals:
            text += f" Its interval overlaps those of {', '.join(rivals)}: with these sizes the alpha ranking is not resolved."
        else:
            text += " Its interval overlaps no other config's."
        out.append(text)
    if rankings.get("ppl_per_parameter"):
        r = rankings["ppl_per_parameter"][0]
        if r["ppl_gain"] > 0:
            extra = f"{r['extra_mparams']:.2f}M" if r["extra_mparams"] >= 1 else f"{1000 * r['extra_mparams']:.1f}k"
            out.append(f"Best PPL per parameter: {r['config']} ({r['ppl_gain']:.1f} PPL better than {r['reference']} for {extra} more phase-1 parameters).")
    if by_ppl and by_alpha:
        if by_ppl[0].name == by_alpha[0].name:
            out.append(f"Recommendation: {by_ppl[0].name}, best both in PPL and in alpha.")
        else:
            out.append(f"Recommendation: {by_ppl[0].name} at the data sizes measured; {by_alpha[0].name} if much more data is expected, "
                       "to be confirmed at larger sizes since the alpha intervals " + ("overlap." if overlaps else "are apart."))  # fmt: skip
    return out


def compare(ours: Report, theirs: Report) -> list[dict[str, Any]]:
    """Side by side per config name: alpha and best PPL here and there, and the differences."""
    rows = []
    mine = {r.config: r for r in ours.summary}
    iters = {c.name: _iterations(c) for c in ours.configs}
    iters_ref = {c.name: _iterations(c) for c in theirs.configs}
    for r in theirs.summary:
        m = mine.get(r.config)
        if m is None:
            continue
        rows.append({
            "config": r.config,
            "alpha": m.alpha, "alpha_ref": r.alpha,
            "d_alpha": None if m.alpha is None or r.alpha is None else m.alpha - r.alpha,
            "best_ppl": m.best_ppl, "best_ppl_ref": r.best_ppl, "d_ppl": m.best_ppl - r.best_ppl,
            "d_ppl_rel": m.best_ppl / r.best_ppl - 1,
            "r2": m.r2, "r2_ref": r.r2, "best_acc": m.best_acc, "best_acc_ref": r.best_acc,
            "val_er": m.val_er, "val_er_ref": r.val_er,
            "phase1_iterations": iters.get(r.config), "phase1_iterations_ref": iters_ref.get(r.config),
        })  # fmt: skip
    return rows


def _iterations(c: ConfigResult):
    """Phase-1 iterations per size, or the single count published for the config."""
    per_size = [s.phase1_iterations for s in c.sizes if s.phase1_iterations is not None]
    return per_size or c.extra.get("phase1_iterations")
