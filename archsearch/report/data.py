"""The numbers of a report, computed from per-config results (pure: no Optuna, no Ray, no I/O).

A report is what a researcher writes after a grid: a summary table, the settings, per-config
tables per size, the fitted law with its interval, what the alpha differences mean in PPL,
rankings and a recommendation stated with its uncertainty. :func:`build_report` computes all
of it from :class:`ConfigResult` records (from a study, or from published numbers); the
renderers in ``render.py`` only format and draw.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from archsearch.scaling import ScalingFit, fit_power_law

GAP_TOKENS = (1_000_000, 10_000_000)
"""Token counts at which the PPL gap between configs is stated."""
DEFAULT_TARGET = 10_000_000
"""Target of the PPL-at-target ranking when the study's objective names none."""
EXTRAPOLATION_CAVEAT_FACTOR = 10
"""A number at more than this many times the largest trained size gets a caveat."""
Z95 = 1.959963984540054


@dataclass
class SizeRow:
    tokens: int
    ppl: float
    acc: float | None = None
    val_er: float | None = None
    samples: int | None = None
    train_er: float | None = None
    phase1_iterations: float | None = None
    val_loss_se: float | None = None
    """Standard error of ln PPL at this size (from the per-token losses; None: not measured)."""
    capped: list[str] = field(default_factory=list)
    """Training caps the size's runs hit (archsearch.result.CAP_FLAGS)."""
    phase1_convergence_rate: float | None = None
    best_epoch: float | None = None
    precision: str | None = None
    """The arithmetic the size's runs used (fp32, tf32, bf16; None: not recorded)."""
    device: str | None = None
    retried: dict[str, int] = field(default_factory=dict)
    """The raised caps the size was trained again with (``capped: {retry: ...}``); empty:
    its first runs stood."""
    val_loss: float | None = None
    """Mean validation loss (ln PPL; with several seeds their mean, so PPL = exp(val_loss))."""
    seeds: list[int] = field(default_factory=list)
    val_ppl_seeds: list[float] = field(default_factory=list)
    """Each seed's PPL, in ``seeds`` order (empty with one seed)."""

    def ppl_interval(self) -> tuple[float, float] | None:
        if self.val_loss_se is None or not math.isfinite(self.val_loss_se):
            return None
        return self.ppl * math.exp(-Z95 * self.val_loss_se), self.ppl * math.exp(Z95 * self.val_loss_se)


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
    infeasible: str | None = None
    """Why the study marked it infeasible (admissibility rule, capped runs); None: feasible."""
    model: dict[str, Any] | None = None
    """The family's model config as the trial ran it (``family`` and its fields), where the
    study recorded it (user attr ``model``); None: older studies, published numbers."""
    admitted_early: str | None = None
    """Set by the report (:func:`rejudge`): why the admissibility rule, which admitted it
    against the best so far, rejects it against the study's final best; None: it passes."""

    @property
    def feasible(self) -> bool:
        """Neither marked infeasible by the study nor rejected by the report's re-judging."""
        return self.infeasible is None and self.admitted_early is None

    @property
    def largest(self) -> SizeRow:
        return max(self.sizes, key=lambda s: s.tokens)

    @property
    def best(self) -> SizeRow:
        """The size with the lowest PPL (its own size, not the largest one)."""
        return min(self.sizes, key=lambda s: s.ppl)


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
    target_tokens: float = DEFAULT_TARGET
    ppl_target: float = math.nan
    ppl_target_low: float = math.nan
    ppl_target_high: float = math.nan
    ci_method: str = ""
    measured_se: bool = False
    """Whether the interval includes the per-size standard errors (else the jackknife alone)."""

    @property
    def alpha_contains_zero(self) -> bool:
        return math.isfinite(self.alpha_low) and self.alpha_low <= 0 <= self.alpha_high


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
    best_tokens: int = 0
    """The size at which best_ppl was measured."""
    alpha_low: float | None = None
    alpha_high: float | None = None
    ppl_target: float | None = None
    ppl_target_low: float | None = None
    ppl_target_high: float | None = None
    flags: list[str] = field(default_factory=list)
    """Short flags: "α∋0", "capped", "infeasible"."""


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
    caveats: dict[str, str] = field(default_factory=dict)
    """Per extrapolated count ("1M", "10M", "target"): why a number there is a guess."""
    flags: dict[str, list[str]] = field(default_factory=dict)
    """Per config: sentences on what its numbers rest on (α interval contains 0, capped runs, infeasible)."""
    resolved: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per criterion: the leader against every other config, whether their intervals are apart."""
    er_relation: dict[str, Any] = field(default_factory=dict)
    conclusions: list[dict[str, str]] = field(default_factory=list)
    """Rows of the conclusion table: criterion, config, reason (in numbers)."""
    pareto: list[dict[str, Any]] = field(default_factory=list)
    """Multi-objective studies: the front, each config with its values and intervals."""
    protocol: list[str] = field(default_factory=list)
    """Sentences on how the configs' runs differ in protocol (arithmetic, seeds, engine version,
    data content, raised caps): numbers ranked side by side that were not made the same way."""

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


def law_of(cfg: ConfigResult, target_tokens: float = DEFAULT_TARGET) -> tuple[Law, ScalingFit] | None:
    if len(cfg.sizes) < 2:
        return None
    fit = fit_power_law([s.tokens for s in cfg.sizes], [s.ppl for s in cfg.sizes], ln_se=[s.val_loss_se for s in cfg.sizes])
    ex = fit.extrapolate(target_tokens)
    # a line through two points fits them exactly: R^2 = 1 says nothing there
    law = Law(fit.alpha, fit.A, fit.r2 if fit.n >= 3 else math.nan, fit.alpha_se, fit.alpha_low, fit.alpha_high, fit.ppl_factor_per_decade(),
              {t: fit.predict(t) for t in GAP_TOKENS}, list(fit.loo_alphas), list(fit.loo_intercepts),
              float(target_tokens), ex.ppl, ex.low, ex.high, fit.ci_method, bool(fit.ln_se))  # fmt: skip
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


def _apart(a_low: float, a_high: float, b_low: float, b_high: float) -> bool:
    if any(x is None or not math.isfinite(x) for x in (a_low, a_high, b_low, b_high)):
        return False  # no interval: nothing is resolved
    return a_high < b_low or b_high < a_low


def intervals_overlap(a: Law, b: Law) -> bool:
    return not _apart(a.alpha_low, a.alpha_high, b.alpha_low, b.alpha_high)


NO_INTERVAL = "no interval: the jackknife needs 3 sizes, these are 2"


def has_interval(law: Law) -> bool:
    return math.isfinite(law.alpha_low) and math.isfinite(law.alpha_high)


def alpha_interval_text(law: Law) -> str:
    """"[low, high]" of alpha, or why there is none (2 sizes), never "[nan, nan]"."""
    return f"[{law.alpha_low:.4f}, {law.alpha_high:.4f}]" if has_interval(law) else f"({NO_INTERVAL})"


def _below_one(law: Law) -> bool:
    return any(math.isfinite(v) and v < 1 for v in (law.ppl_target, law.ppl_target_low))


def extrapolation_caveat(tokens: float, largest: int) -> str | None:
    """A caveat for a number at ``tokens`` when that is more than 10x the largest trained size."""
    if largest <= 0 or tokens <= EXTRAPOLATION_CAVEAT_FACTOR * largest:
        return None
    return (f"{short_count(tokens)} tokens is {tokens / largest:,.0f}× the largest trained size ({largest:,} tokens): "
            "numbers there extrapolate the fitted law far beyond the data and are no measurement")  # fmt: skip


def fmt_ppl(v: float | None) -> str:
    """A PPL or interval bound: one decimal, or three significant digits below 10 (an
    extrapolated lower bound can be far below 1)."""
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def short_count(n: float) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else (f"{n / 1e3:g}k" if n >= 1e3 else f"{n:g}")


def target_of(meta: dict[str, Any]) -> float:
    """The study's ppl_at target (objective label ppl_at_10M -> 1e7), else DEFAULT_TARGET."""
    if meta.get("target_tokens"):
        return float(meta["target_tokens"])
    for label in meta.get("objectives") or []:
        if str(label).startswith("ppl_at_"):
            text = str(label).removeprefix("ppl_at_")
            mult = {"k": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:], 1.0)
            try:
                return float(text.rstrip("kMB")) * mult
            except ValueError:
                pass
    return DEFAULT_TARGET


def ranked_by(meta: dict[str, Any]) -> str:
    """What a search's top configs are chosen by: its first objective (the value each trial
    told the study, in the study's direction), as the study names it."""
    first = str((meta.get("objectives") or ["alpha"])[0])
    directions = meta.get("directions") or ["minimize"]
    return f"{first}, {'lowest' if directions[0] == 'minimize' else 'highest'} first"


CVFP_SETTINGS = ("num_layers", "context_dim", "num_input_tokens")
"""The Settings table's columns for CVFP configs (then embed_dim and the searched dotted fields)."""


def _family_defaults(family: str) -> dict[str, Any] | None:
    """The defaults of a family's config fields, in their order; None where the family cannot
    be loaded here (a user's family named only by its registered name)."""
    from archsearch.families import get_family

    try:
        cls = get_family(family).config
    except Exception:
        return None
    return {f.name: f.default if f.default is not dataclasses.MISSING else None for f in dataclasses.fields(cls)}


def settings_rows(configs: Sequence[ConfigResult]) -> list[dict[str, Any]]:
    """The Settings table, one row per config with its ``family``, by the family's own field
    names. CVFP: CVFP_SETTINGS, embed_dim and the searched dotted fields. Another family: its
    fields that are searched, set away from the family's default, or different between its
    configs (values as run where the study recorded the model config, else the searched
    values); a searched parameter that is not one of the family's fields (another family's,
    in a cross-family search) is not shown for it."""
    rows: dict[str, dict[str, Any]] = {}
    by_family: dict[str, list[ConfigResult]] = {}
    for c in configs:
        by_family.setdefault(c.family, []).append(c)
    for family, members in by_family.items():
        if family == "cvfp":
            for c in members:
                rows[c.name] = {"config": c.name, "family": family, **{k: c.params.get(k) for k in CVFP_SETTINGS},
                                "embed_dim": None if c.embed_dim is None else int(c.embed_dim), **{k: v for k, v in c.params.items() if "." in k}}  # fmt: skip
            continue
        defaults = _family_defaults(family)
        values = []
        for c in members:
            model = {k: v for k, v in (c.model or {}).items() if k != "family"}
            v = {**{k: x for k, x in c.params.items() if k != "family"}, **model}  # the values as run win
            own = defaults if defaults is not None else (model or v)
            values.append({k: x for k, x in v.items() if k in own})
        names = list(defaults) if defaults is not None else list(dict.fromkeys(k for v in values for k in v))
        searched = {k for c in members for k in c.params}
        shown_names = [k for k in names if any(k in v for v in values) and (
            k in searched or len({repr(v.get(k)) for v in values}) > 1 or (defaults is not None and any(v.get(k, defaults[k]) != defaults[k] for v in values)))]  # fmt: skip
        for c, v in zip(members, values):
            rows[c.name] = {"config": c.name, "family": family, **{k: v.get(k) for k in shown_names}}
    return [rows[c.name] for c in configs]


def rejudge(configs: Sequence[ConfigResult]) -> list[ConfigResult]:
    """The admissibility rule (``admissible.max_ppl_ratio``) again, against the study's final
    best PPL at the largest size. A search judged each trial when it finished, against the
    best so far, so an early trial was admitted against a weaker best than a later one: a
    config the rule admitted that is above the ratio now gets ``admitted_early`` (the report
    ranks and treats it as infeasible; the study's constraint stays as it was told). Only
    configs the rule judged (``extra["admissibility"]``) are re-judged."""
    judged = [c for c in configs if (c.extra or {}).get("admissibility")]
    if not judged:
        return list(configs)
    finals = [c.extra["admissibility"].get("final_ppl") or c.largest.ppl for c in judged]
    best = min(finals)
    out = []
    for c in configs:
        rule = (c.extra or {}).get("admissibility")
        if rule and c.infeasible is None:
            final = rule.get("final_ppl") or c.largest.ppl
            ratio, limit = final / best, rule["max_ppl_ratio"]
            if ratio > limit:
                c = dataclasses.replace(c, admitted_early=(
                    f"admitted only because it came early: its PPL at the largest size ({final:.1f}) was {rule['ppl_ratio']:.2f}x the "
                    f"best when it finished ({rule['best_final_ppl']:.1f}), but is {ratio:.2f}x the study's final best ({best:.1f}), "
                    f"above admissible.max_ppl_ratio {limit:g}"))  # fmt: skip
        out.append(c)
    return out


def _names(by: dict[str, list[str]]) -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in by.items())


def protocol_notes(configs: Sequence[ConfigResult], meta: dict[str, Any]) -> list[str]:
    """Where the configs' numbers were not made the same way: their runs' arithmetic
    (``precision``, e.g. a study run on a CPU in fp32 and continued on a GPU in bf16: the
    study's signature holds ``engine.precision: auto``, which each device resolves its own
    way), their seeds, sizes trained again with raised caps, and, from the study's run
    records, the engine versions and data fingerprints of its runs. Empty: one protocol."""
    out = []
    by_precision: dict[str, list[str]] = {}
    by_seeds: dict[str, list[str]] = {}
    for c in configs:
        precisions = sorted({s.precision for s in c.sizes if s.precision})
        if precisions:
            by_precision.setdefault("/".join(precisions), []).append(c.name)
        seeds = sorted({tuple(s.seeds) for s in c.sizes if s.seeds})
        if seeds:
            by_seeds.setdefault(" | ".join(",".join(map(str, x)) for x in seeds), []).append(c.name)
    if len(by_precision) > 1:
        out.append(f"the configs' runs used different arithmetic ({_names(by_precision)}): their PPLs differ by the "
                   "arithmetic as well as by the architecture")  # fmt: skip
    if len(by_seeds) > 1:
        out.append(f"the configs were trained with different seeds ({_names({f'seeds {k}': v for k, v in by_seeds.items()})})")
    retried = [c.name for c in configs if any(s.retried for s in c.sizes)]
    if retried:
        out.append(f"some sizes were trained again with raised caps (capped: retry) for {', '.join(retried)}: those sizes ran "
                   "longer than the others' (see each config's table)")  # fmt: skip
    # the space's rules on finished trials are not part of a study's signature: a study continued
    # with another capped or admissible rule judged its trials by two rules
    capped_rule = [c.name for c in configs if c.infeasible and "capped: infeasible" in c.infeasible]
    capped_kept = [c.name for c in configs if any(s.capped for s in c.sizes) and c.name not in capped_rule]
    if capped_rule and capped_kept:
        out.append(f"capped runs made {', '.join(capped_rule)} infeasible (capped: infeasible) but not {', '.join(capped_kept)}, "
                   "which are capped too: the study's trials were judged by different capped rules")  # fmt: skip
    ratios: dict[str, list[str]] = {}
    for c in configs:
        rule = (c.extra or {}).get("admissibility")
        ratios.setdefault(f"max_ppl_ratio {rule['max_ppl_ratio']:g}" if rule else "not judged", []).append(c.name)
    if len(ratios) > 1:
        out.append(f"the configs were judged by different admissibility rules ({_names(ratios)})")
    runs = meta.get("runs") or []
    engines = list(dict.fromkeys((r.get("engine_version"), r.get("gpu_engine_version")) for r in runs if r.get("engine_version") is not None))
    if len(engines) > 1:
        text = ", ".join(f"engine {e}" + (f" (GPU paths {g})" if g is not None else "") for e, g in engines)
        out.append(f"the study's runs used different engine versions ({text}): trials of different runs may differ by the engine")
    prints = list(dict.fromkeys(r.get("data_fingerprint") for r in runs if r.get("data_fingerprint")))
    if len(prints) > 1:
        out.append(f"the study's runs read data with different fingerprints ({', '.join(prints)}): the data's content changed "
                   "between runs, so trials of different runs were trained or validated on different tokens")  # fmt: skip
    return out


def _flags(c: ConfigResult, law: Law | None) -> tuple[list[str], list[str]]:
    """(short flags, sentences) for one config."""
    short, text = [], []
    if c.infeasible:
        short.append("infeasible")
        text.append(f"marked infeasible by the study: {c.infeasible}")
    if c.admitted_early:
        short.append("admitted early")
        text.append(c.admitted_early)
    capped = [s for s in c.sizes if s.capped]
    if capped:
        short.append("capped")
        kinds = sorted({f for s in capped for f in s.capped})
        per = "; ".join(f"{k} at {sum(1 for s in c.sizes if k in s.capped)}/{len(c.sizes)} sizes" for k in kinds)
        text.append(f"its fit rests on runs that hit a training cap while still improving ({per}: "
                    f"{', '.join(f'{s.tokens:,}' for s in capped)} tokens); its α and extrapolations flatter an under-trained model")  # fmt: skip
    retried = [s for s in c.sizes if s.retried]
    if retried:
        short.append("retried")
        text.append("trained again with raised caps at " + "; ".join(
            f"{s.tokens:,} tokens ({', '.join(f'{k}={v}' for k, v in s.retried.items())})" for s in retried)
            + ": those sizes ran longer than the others")  # fmt: skip
    if law is not None and law.alpha > 0 and not law.alpha_contains_zero:
        short.append("α>0")
        where = f"its α interval [{law.alpha_low:.4f}, {law.alpha_high:.4f}] lies above 0" if has_interval(law) else f"its α is {law.alpha:+.4f} ({NO_INTERVAL})"
        text.append(f"{where}: its PPL rises with more data at these sizes, so its law and extrapolations describe a model "
                    "that gets worse with data (look at its runs before ranking it)")  # fmt: skip
    if law is not None and law.alpha_contains_zero:
        short.append("α∋0")
        text.append(f"its α interval [{law.alpha_low:.4f}, {law.alpha_high:.4f}] contains 0: these sizes do not show its PPL falling with data")
    return short, text


def _first_objective(c: ConfigResult, laws: dict[str, Law], meta: dict[str, Any]) -> float:
    """The config's first objective as the study ranks it (smaller is better): the value the
    trial told the study, negated for ``maximize``; for records without values (published
    numbers), the law's alpha or PPL at target, or the final PPL, as the objective's label says."""
    directions = meta.get("directions") or ["minimize"]
    if c.values:
        v = float(c.values[0]) if directions[0] == "minimize" else -float(c.values[0])
    else:
        first = str((meta.get("objectives") or ["alpha"])[0])
        law = laws.get(c.name)
        if first.startswith("ppl_at"):
            v = law.ppl_target if law else math.inf
        elif first == "final_ppl":
            v = c.largest.ppl
        else:
            v = law.alpha if law else math.inf
    return v if math.isfinite(v) else math.inf


def _ranked(configs: Sequence[ConfigResult], value) -> list[ConfigResult]:
    """``configs`` by ``value`` (smaller first), every feasible config before the infeasible
    ones (marked so by the study, or admitted early: :func:`rejudge`), non-finite values last
    within each group; ties keep the study's order."""
    def key(c: ConfigResult) -> tuple[bool, float]:
        v = value(c)
        return (not c.feasible, v if v is not None and math.isfinite(v) else math.inf)

    return sorted(configs, key=key)


def build_report(configs: Sequence[ConfigResult], title: str = "Architecture comparison", meta: dict | None = None,
                 top: int | None = None, direction: str = "minimize") -> Report:  # fmt: skip
    """Every number of the report. ``top`` keeps the best ``top`` configs (searches) by the
    study's first objective (PPL at target, final PPL or alpha), feasible ones first."""
    meta = dict(meta or {})
    target = target_of(meta)
    configs = rejudge([c for c in configs if c.sizes])
    protocol = protocol_notes(configs, meta)
    precision = {c.name: "/".join(sorted({s.precision for s in c.sizes if s.precision})) for c in configs}
    mixed_precision = len(set(precision.values())) > 1
    fits = {c.name: law_of(c, target) for c in configs}
    laws = {n: lf[0] for n, lf in fits.items() if lf is not None}
    pareto = _pareto(configs, laws, meta)  # over every config: the front's members need not be in the top
    if top is not None:
        configs = _ranked(configs, lambda c: _first_objective(c, laws, meta))[:top]
        laws = {c.name: laws[c.name] for c in configs if c.name in laws}
    flags: dict[str, list[str]] = {}
    summary = []
    for c in configs:
        best = c.best
        law = laws.get(c.name)
        short, text = _flags(c, law)
        if mixed_precision:  # the study mixes arithmetic: each row says its own
            short.append(precision[c.name] or "precision?")
        if text:
            flags[c.name] = text
        summary.append(SummaryRow(c.name, c.phase1_params, law.alpha if law else None, law.r2 if law else None, best.ppl,
                                  max((s.acc for s in c.sizes if s.acc is not None), default=None), best.val_er, best.tokens,
                                  law.alpha_low if law else None, law.alpha_high if law else None,
                                  law.ppl_target if law else None, law.ppl_target_low if law else None,
                                  law.ppl_target_high if law else None, short))  # fmt: skip
    settings = settings_rows(configs)

    with_law = [c for c in configs if c.name in laws]
    by_alpha = _ranked(with_law, lambda c: laws[c.name].alpha)
    by_ppl = _ranked(configs, lambda c: c.best.ppl)
    by_target = _ranked(with_law, lambda c: laws[c.name].ppl_target)
    rankings: dict[str, list[dict[str, Any]]] = {
        "best_ppl": [{"config": c.name, "ppl": c.best.ppl, "tokens": c.best.tokens,
                      "ppl_low": (c.best.ppl_interval() or (None, None))[0], "ppl_high": (c.best.ppl_interval() or (None, None))[1]}
                     for c in by_ppl],  # fmt: skip
        "best_alpha": [{"config": c.name, "alpha": laws[c.name].alpha, "alpha_low": laws[c.name].alpha_low,
                        "alpha_high": laws[c.name].alpha_high} for c in by_alpha],  # fmt: skip
        "ppl_at_target": [{"config": c.name, "target_tokens": target, "ppl": laws[c.name].ppl_target,
                           "low": laws[c.name].ppl_target_low, "high": laws[c.name].ppl_target_high} for c in by_target],  # fmt: skip
    }
    rankings["cost_performance"] = _cost_performance(configs)

    largest = max((s.tokens for c in configs for s in c.sizes), default=0)
    caveats = {}
    for t in GAP_TOKENS:
        if (text := extrapolation_caveat(t, largest)) is not None:
            caveats[short_count(t)] = text
    if (text := extrapolation_caveat(target, largest)) is not None:
        caveats["target"] = text
    below = [c.name for c in configs if c.name in laws and _below_one(laws[c.name])]
    if below:
        caveats["below_1"] = (f"the PPL at {short_count(target)} tokens or its interval's lower end is below 1 for {', '.join(below)}: "
                              "no model reaches a PPL below 1 (a loss below 0); the power law has no floor, so there it "
                              "extrapolates past what is possible")  # fmt: skip

    anchor = median_size(configs) if configs else 1
    gaps = []
    if len(by_alpha) >= 2:
        pairs = [(by_alpha[0], by_alpha[-1])]
        if by_ppl and by_ppl[0].name in laws and by_ppl[0].name not in (by_alpha[0].name, by_alpha[-1].name):
            pairs.insert(0, (by_alpha[0], by_ppl[0]))
        for a, b in pairs:
            la, lb = laws[a.name], laws[b.name]
            gaps.append(Gap(a.name, b.name, la.alpha - lb.alpha,
                            {t: la.ppl_at[t] / lb.ppl_at[t] - 1 for t in GAP_TOKENS},
                            {t: alpha_gap(la.alpha, lb.alpha, t, anchor) for t in GAP_TOKENS}, anchor))  # fmt: skip

    overlaps = [(a.name, b.name) for i, a in enumerate(by_alpha) for b in by_alpha[i + 1 :] if intervals_overlap(laws[a.name], laws[b.name])]
    resolved = _resolved(by_ppl, by_alpha, by_target, laws)
    er = _er_relation(configs)
    conclusions = _conclusions(by_ppl, by_alpha, by_target, laws, rankings, resolved, target, caveats)
    recommendation = _recommend(by_ppl, by_alpha, by_target, laws, overlaps, rankings, resolved, target, flags)
    families, matched = family_tables(configs, laws)
    return Report(title, summary, settings, list(configs), laws, gaps, rankings, recommendation, overlaps, meta,
                  families=families, matched=matched, caveats=caveats, flags=flags, resolved=resolved, er_relation=er,
                  conclusions=conclusions, pareto=pareto, protocol=protocol)  # fmt: skip


def _resolved(by_ppl, by_alpha, by_target, laws) -> dict[str, list[dict[str, Any]]]:
    """The leader of each criterion against every other config: are their intervals apart?
    Best PPL: the per-size standard errors (at each config's own best size); α and PPL at
    target: the fits' intervals."""
    out: dict[str, list[dict[str, Any]]] = {}
    lead = by_ppl[0].best.ppl_interval() if by_ppl else None
    if len(by_ppl) >= 2 and lead is not None:  # older studies recorded no standard errors
        out["best_ppl"] = [{"leader": by_ppl[0].name, "other": c.name,
                            "resolved": bool((iv := c.best.ppl_interval()) and _apart(*lead, *iv))} for c in by_ppl[1:]]  # fmt: skip
    for key, ranked, lo, hi in (("best_alpha", by_alpha, "alpha_low", "alpha_high"), ("ppl_at_target", by_target, "ppl_target_low", "ppl_target_high")):
        if len(ranked) >= 2:
            la = laws[ranked[0].name]
            ends = lambda law: (getattr(law, lo), getattr(law, hi))  # noqa: E731
            out[key] = [{"leader": ranked[0].name, "other": c.name, "resolved": _apart(*ends(la), *ends(laws[c.name])),
                         "intervals": all(math.isfinite(v) for v in (*ends(la), *ends(laws[c.name])))}
                        for c in ranked[1:]]  # fmt: skip
    return out


def _resolved_text(rows: list[dict[str, Any]]) -> str:
    apart = [r["other"] for r in rows if r["resolved"]]
    close = [r["other"] for r in rows if not r["resolved"] and r.get("intervals", True)]
    missing = [r["other"] for r in rows if not r["resolved"] and not r.get("intervals", True)]
    parts = []
    if apart:
        parts.append(f"resolved against {', '.join(apart)}")
    if close:
        parts.append(f"not resolved against {', '.join(close)} (intervals overlap)")
    if missing:
        parts.append(f"not resolved against {', '.join(missing)} (no interval: the jackknife needs 3 sizes)")
    return "; ".join(parts)


def _er_relation(configs: Sequence[ConfigResult]) -> dict[str, Any]:
    """Validation ER against PPL at each config's largest size, as in the published report's
    "Effective Rank" finding; Spearman's rank correlation with three configs or more."""
    rows = [{"config": c.name, "val_er": c.largest.val_er, "ppl": c.largest.ppl, "tokens": c.largest.tokens}
            for c in configs if c.largest.val_er is not None]  # fmt: skip
    rows.sort(key=lambda r: -r["val_er"])
    out: dict[str, Any] = {"rows": rows, "spearman": None}
    if len(rows) >= 3 and len({r["val_er"] for r in rows}) > 1 and len({r["ppl"] for r in rows}) > 1:
        from scipy import stats

        out["spearman"] = float(stats.spearmanr([r["val_er"] for r in rows], [r["ppl"] for r in rows]).statistic)
    return out


def _overlap_count(rows: list[dict[str, Any]] | None) -> str:
    """"; overlaps n of m others" (or "; apart from every other") for a leader's rows of
    :func:`_resolved`; "" without rows."""
    if not rows:
        return ""
    n_close = sum(1 for r in rows if not r["resolved"])
    return f"; not resolved against {n_close} of {len(rows)} others" if n_close else "; apart from every other"


def _conclusions(by_ppl, by_alpha, by_target, laws, rankings, resolved, target, caveats) -> list[dict[str, str]]:
    rows = []
    if by_ppl:
        b = by_ppl[0]
        reason = f"PPL {b.best.ppl:.1f} at {b.best.tokens:,} tokens (lowest)"
        if b.best.acc is not None:
            reason += f", accuracy {100 * b.best.acc:.1f}%"
        if len(by_ppl) > 1:
            nxt = by_ppl[1]
            reason += f"; next {nxt.name} {nxt.best.ppl:.1f} ({100 * (nxt.best.ppl / b.best.ppl - 1):+.1f}%)"
            if resolved.get("best_ppl"):
                reason += ", resolved" if resolved["best_ppl"][0]["resolved"] else ", not resolved by the per-size standard errors"
        rows.append({"criterion": "absolute PPL", "config": b.name, "reason": reason})
    if by_alpha:
        a = by_alpha[0]
        la = laws[a.name]
        reason = f"α = {la.alpha:.4f} {alpha_interval_text(la)} (most negative)"
        reason += _overlap_count(resolved.get("best_alpha"))
        rows.append({"criterion": "data efficiency", "config": a.name, "reason": reason})
    if by_target:
        t = by_target[0]
        lt = laws[t.name]
        reason = f"PPL {fmt_ppl(lt.ppl_target)} [{fmt_ppl(lt.ppl_target_low)}, {fmt_ppl(lt.ppl_target_high)}] at {short_count(target)} tokens by its law"
        reason += _overlap_count(resolved.get("ppl_at_target"))
        if "target" in caveats:
            reason += f" (extrapolated {target / max(s.tokens for s in t.sizes):,.0f}× beyond the data)"
        rows.append({"criterion": f"PPL at {short_count(target)} tokens", "config": t.name, "reason": reason})
    if rankings.get("cost_performance"):
        config, reason = _cost_reason(rankings["cost_performance"])
        rows.append({"criterion": "cost-performance", "config": config, "reason": reason})
    return rows


def _params_text(mparams: float) -> str:
    return f"{mparams:.2f}M" if mparams >= 1 else f"{1000 * mparams:.1f}k"


def _pareto(configs: Sequence[ConfigResult], laws: dict[str, Law], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-dominated feasible configs of a multi-objective study, by their recorded values."""
    directions = meta.get("directions") or []
    if len(directions) < 2:
        return []
    pts = [c for c in configs if c.values and len(c.values) == len(directions) and c.feasible]
    sign = [1 if d == "minimize" else -1 for d in directions]

    def dominates(a, b) -> bool:
        va, vb = [s * v for s, v in zip(sign, a.values)], [s * v for s, v in zip(sign, b.values)]
        return all(x <= y for x, y in zip(va, vb)) and any(x < y for x, y in zip(va, vb))

    front = [c for c in pts if not any(dominates(o, c) for o in pts if o is not c)]
    front.sort(key=lambda c: c.values[0])
    out = []
    for c in front:
        law = laws.get(c.name)
        out.append({"config": c.name, "trial": c.number, "values": dict(zip(meta.get("objectives") or [], c.values)),
                    "ppl_target": law.ppl_target if law else None, "ppl_target_low": law.ppl_target_low if law else None,
                    "ppl_target_high": law.ppl_target_high if law else None, "alpha_low": law.alpha_low if law else None,
                    "alpha_high": law.alpha_high if law else None, "total_params": c.total_params})  # fmt: skip
    return out


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


COST_TOLERANCE = 0.05
"""Cost-performance: the config with the fewest parameters whose PPL is within this fraction
of the best PPL (at the study's largest size)."""


def _cost_performance(configs: Sequence[ConfigResult]) -> list[dict[str, Any]]:
    """The parameters-PPL front at the study's largest size, fewest parameters first, the
    cost-performance pick marked (``pick``): the config with the fewest parameters whose PPL
    is at most (1 + COST_TOLERANCE) times the best one there (``best``). Feasible configs
    trained at that size only (pruned ones are not compared at a size they did not reach).
    Parameters: the total trainable ones where every config has them, else CVFP's phase-1
    ones (published reports). The pick depends on no reference config, so it means the same
    in a grid of four and a search of a hundred."""
    largest = max((s.tokens for c in configs for s in c.sizes), default=0)
    at = {c.name: next(s for s in c.sizes if s.tokens == largest) for c in configs
          if c.feasible and any(s.tokens == largest for s in c.sizes)}  # fmt: skip
    pts = [c for c in configs if c.name in at]
    count = "total" if pts and all(c.total_params for c in pts) else "phase1"
    pts = [c for c in pts if (c.total_params if count == "total" else c.phase1_params)]
    if len(pts) < 2:
        return []
    n_params = {c.name: c.total_params if count == "total" else c.phase1_params for c in pts}
    pts.sort(key=lambda c: (n_params[c.name], at[c.name].ppl))
    front, lowest = [], math.inf
    for c in pts:  # fewest parameters first: on the front when it beats every cheaper config
        if at[c.name].ppl < lowest:
            front.append(c)
            lowest = at[c.name].ppl
    best = front[-1]
    limit = at[best.name].ppl * (1 + COST_TOLERANCE)
    pick = next(c for c in front if at[c.name].ppl <= limit)
    rows = []
    for c in front:
        low, high = at[c.name].ppl_interval() or (None, None)
        rows.append({"config": c.name, "params": n_params[c.name], "count": count, "tokens": largest, "ppl": at[c.name].ppl,
                     "ppl_low": low, "ppl_high": high, "ppl_vs_best": at[c.name].ppl / at[best.name].ppl - 1,
                     "pick": c is pick, "best": c is best, "tolerance": COST_TOLERANCE})  # fmt: skip
    return rows


def _cost_reason(front: list[dict[str, Any]]) -> tuple[str, str]:
    """(config, reason) of the conclusion table's cost-performance row."""
    pick = next(r for r in front if r["pick"])
    best = next(r for r in front if r["best"])
    what = "parameters" if pick["count"] == "total" else "phase-1 parameters"
    tol = f"{100 * pick['tolerance']:.0f}%"
    if pick is best:
        reason = f"lowest PPL at {pick['tokens']:,} tokens ({pick['ppl']:.1f}, {_params_text(pick['params'] / 1e6)} {what})"
        cheaper = [r for r in front if r["params"] < pick["params"]]
        if cheaper:
            c = cheaper[-1]
            reason += (f"; no config with fewer parameters is within {tol} of it (the closest, {c['config']}: "
                       f"{c['ppl']:.1f}, {100 * c['ppl_vs_best']:+.1f}% with {best['params'] / c['params']:.2f}× fewer)")  # fmt: skip
        else:
            reason += "; it also has the fewest parameters"
        return pick["config"], reason
    reason = (f"PPL {pick['ppl']:.1f} at {pick['tokens']:,} tokens with {_params_text(pick['params'] / 1e6)} {what}: within {tol} of the best, "
              f"{best['config']} ({best['ppl']:.1f}, {100 * pick['ppl_vs_best']:+.1f}%), with {best['params'] / pick['params']:.2f}× fewer parameters")  # fmt: skip
    if pick["ppl_low"] is not None and best["ppl_low"] is not None:
        apart = _apart(pick["ppl_low"], pick["ppl_high"], best["ppl_low"], best["ppl_high"])
        reason += "; the difference is resolved by the per-size standard errors" if apart else "; the two are not resolved by the per-size standard errors"
    return pick["config"], reason


def _recommend(by_ppl, by_alpha, by_target, laws, overlaps, rankings, resolved, target, flags) -> list[str]:
    out = []
    if by_ppl:
        b = by_ppl[0]
        text = f"Best absolute PPL: {b.name} ({b.best.ppl:.1f} at {b.best.tokens:,} tokens)."
        if resolved.get("best_ppl"):
            text += f" Against the per-size standard errors it is {_resolved_text(resolved['best_ppl'])}."
        out.append(text)
    if by_alpha:
        a = by_alpha[0]
        la = laws[a.name]
        rivals = [y if x == a.name else x for x, y in overlaps if a.name in (x, y)]
        if not has_interval(la):
            text = (f"Best data efficiency (most negative alpha): {a.name} (alpha = {la.alpha:.4f}, {NO_INTERVAL})."
                    " Without intervals the alpha ranking is not resolved.")  # fmt: skip
        elif rivals:
            text = f"Best data efficiency (most negative alpha): {a.name} (alpha = {la.alpha:.4f}, 95% interval {alpha_interval_text(la)})."
            text += f" Its interval overlaps those of {', '.join(rivals)}: with these sizes the alpha ranking is not resolved."
        else:
            text = (f"Best data efficiency (most negative alpha): {a.name} (alpha = {la.alpha:.4f}, 95% interval {alpha_interval_text(la)})."
                    " Its interval overlaps no other config's.")  # fmt: skip
        out.append(text)
    if by_target:
        t = by_target[0]
        lt = laws[t.name]
        text = (f"Best PPL at {short_count(target)} tokens (extrapolated): {t.name} ({fmt_ppl(lt.ppl_target)}, 95% interval "
                f"[{fmt_ppl(lt.ppl_target_low)}, {fmt_ppl(lt.ppl_target_high)}]).")  # fmt: skip
        if resolved.get("ppl_at_target"):
            text += f" It is {_resolved_text(resolved['ppl_at_target'])}."
        out.append(text)
    if rankings.get("cost_performance"):
        config, reason = _cost_reason(rankings["cost_performance"])
        out.append(f"Best cost-performance (fewest parameters within {100 * COST_TOLERANCE:.0f}% of the best PPL): {config}, {reason}.")
    if by_ppl and by_target:
        # "with more data": the PPL extrapolated to the target, which weighs the level with the
        # slope; alpha alone rewards a config that is bad but falls steeply
        p, t = by_ppl[0], by_target[0]
        if p.name == t.name:
            text = f"Recommendation: {p.name}, best both at the sizes measured and extrapolated to {short_count(target)} tokens"
        else:
            text = f"Recommendation: {p.name} at the data sizes measured"
            if t.name in flags:
                text += f"; {t.name}'s better extrapolation is not a recommendation: {flags[t.name][0]}"
            else:
                rows = resolved.get("ppl_at_target") or []
                apart = any(r["other"] == p.name and r["resolved"] for r in rows)
                text += (f"; {t.name} if much more data is expected (PPL at {short_count(target)} tokens {fmt_ppl(laws[t.name].ppl_target)} "
                         f"against {fmt_ppl(laws[p.name].ppl_target) if p.name in laws else '-'}), to be confirmed at larger sizes since "
                         + ("their intervals are apart" if apart else "their intervals overlap"))  # fmt: skip
        if by_alpha and by_alpha[0].name not in (p.name, t.name):
            text += f"; {by_alpha[0].name}'s steeper alpha alone is no reason (its PPL at {by_alpha[0].best.tokens:,} tokens is {by_alpha[0].best.ppl:.1f})"
        out.append(text + ".")
    elif by_ppl and by_alpha:
        if by_ppl[0].name == by_alpha[0].name:
            out.append(f"Recommendation: {by_ppl[0].name}, best both in PPL and in alpha.")
        else:
            text = f"Recommendation: {by_ppl[0].name} at the data sizes measured"
            a = by_alpha[0]
            if a.name in flags:
                text += f"; {a.name}'s steeper alpha is not a recommendation: {flags[a.name][0]}"
            else:
                why = ("the alpha intervals " + ("overlap" if overlaps else "are apart")) if all(has_interval(laws[c.name]) for c in by_alpha) else "alpha has no interval with 2 sizes"
                text += f"; {a.name} if much more data is expected, to be confirmed at larger sizes since {why}"
            out.append(text + ".")
    flagged = [n for n in flags if n in {c.name for c in by_ppl[:1] + by_alpha[:1] + by_target[:1]}]
    for n in flagged:
        out.append(f"Caution on {n}: " + "; ".join(flags[n]) + ".")
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
