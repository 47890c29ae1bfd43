"""Drawing and writing a :class:`~archsearch.report.data.Report`: Markdown, JSON, CSV, PNG."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from archsearch.report.data import GAP_TOKENS, NO_INTERVAL, Report, compare, fmt_ppl, has_interval, short_count
from archsearch.report.plots import ScalingSeries, _figure, band, plot_scaling, save


def _f(v: Any, spec: str = ".4f", pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else format(v, spec)


def _iters(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return "/".join(f"{x:g}" for x in v) if v else "-"
    return f"{v:g}"


def _m(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n / 1e3:.1f}k"


def _short(count: int) -> str:
    return f"{count / 1e6:g}M" if count >= 1e6 else f"{count / 1e3:g}k"


def _versions(run: dict[str, Any], devices: list[str]) -> str:
    """archsearch's and CVFP's engine version of a run record; with GPU trials, also the
    version of the engine's GPU paths (runcache.GPU_ENGINE_VERSION, part of a GPU run's key)."""
    text = f"{run.get('archsearch_version', '-')} / engine {run.get('engine_version', '-')}"
    if any(d != "cpu" for d in devices):
        gpu = run.get("gpu_engine_version")
        text += f", GPU paths {gpu}" if gpu is not None else ", GPU paths not recorded (a run from before they were)"
    return text


def _capped_cell(s) -> str:
    """A size's caps hit, and the raised caps it was trained again with (``capped: retry``)."""
    text = ", ".join(s.capped)
    if s.retried:
        text += (" " if text else "") + "(retried with " + ", ".join(f"{k}={v}" for k, v in s.retried.items()) + ")"
    return text or "-"


def _seeds_text(seeds: list) -> str:
    """The seeds, and with several how a size's numbers combine them (trial.combine_seeds)."""
    text = ", ".join(str(x) for x in seeds) or "-"
    if len(seeds) > 1:
        text += (" (each size's PPL is the geometric mean over the seeds, exp of their mean loss, and its standard "
                 "error includes their spread; the fit is on those per-size values; runs.csv has each seed's PPL)")  # fmt: skip
    return text


def header(rep: Report) -> list[str]:
    """What a reader needs to reproduce or weigh the numbers: when, with what, on what, how long."""
    m = rep.meta
    if m.get("kind") != "study":
        return [f"Source: {m['source']}", ""] if m.get("source") else []
    counts = ", ".join(f"{v} {k}" for k, v in sorted(m.get("trial_counts", {}).items()))
    if m.get("repeats"):
        counts += f"; {m['repeats']} of these trials are repeats of configs already evaluated, answered from the study and left out below"
    runs = m.get("runs") or []
    last = runs[-1] if runs else {}
    settings = last.get("settings") or {}
    rows = [
        ("Report written", m.get("report_date") or "-"),
        ("Study", f"`{m['study']}` ({m.get('storage', '')}): {counts}"),
        ("Sampler, objective", f"{m.get('sampler')}; " + ", ".join(f"{o} ({d})" for o, d in zip(m.get("objectives", []), m.get("directions", [])))),
        ("Runs", "; ".join(f"{r.get('date', '-')} ({r.get('seconds', 0):.0f} s for the command, {r.get('trial_seconds', 0):.0f} s of it in trials)" for r in runs) or "-"),
        ("archsearch / engine", _versions(last, m.get("devices") or [])),
        ("Device(s)", ", ".join(m.get("devices") or ["-"])),
        ("Data", f"{m.get('data_source')}, fingerprint {last.get('data_fingerprint', '-')}"),
        ("Sizes", f"{', '.join(f'{s:,}' for s in m.get('sizes') or [])} {m.get('size_unit', '')}"),
        ("Seeds", _seeds_text(last.get("seeds") or [])),
        ("Settings other than the defaults", ", ".join(f"`{k}={v}`" for k, v in settings.items()) or ("none" if runs else "-")),
        ("Trial time", f"{m.get('wall_seconds', 0):.0f} s in all (sum over the reported trials)"),
    ]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def protocol_lines(rep: Report) -> list[str]:
    """The ways the reported configs' numbers were not made alike (report.data.protocol_notes)."""
    if not rep.protocol:
        return []
    return ["> ⚠ **Mixed protocols**: the configs below are ranked side by side, but " + "; ".join(rep.protocol) + ".", ""]


def _setting(v: Any) -> str:
    return "-" if v is None else str(v)


def settings_tables(rows: list[dict[str, Any]]) -> list[str]:
    """One table per family (in the order the families first appear), each with the family's
    own field names (report.data.settings_rows); a family's heading only when there are several."""
    families = list(dict.fromkeys(r.get("family", "cvfp") for r in rows))
    out: list[str] = []
    for family in families:
        members = [r for r in rows if r.get("family", "cvfp") == family]
        keys = list(dict.fromkeys(k for r in members for k in r if k not in ("config", "family")))
        if len(families) > 1:
            out += [f"**{family}**", ""]
        out += ["| Config | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        out += [f"| {r['config']} | " + " | ".join(_setting(r.get(k)) for k in keys) + " |" for r in members]
        out.append("")
    return out[:-1]


def markdown(rep: Report, comparison: list[dict[str, Any]] | None = None, compare_label: str = "", plots: list[str] = ()) -> str:
    m = rep.meta
    out = [f"# {rep.title}", ""] + header(rep) + protocol_lines(rep)
    if m.get("top"):
        out += [f"A search: the tables show the {len(rep.summary)} best configs of {m.get('n_configs')} by {m.get('ranked_by', 'alpha')} "
                "(feasible ones first).", ""]  # fmt: skip

    out += summary_table(rep)
    out += _family_section(rep)
    out += ["", "## Settings", ""] + settings_tables(rep.settings)

    out += ["", "## Results per config", ""]
    for i, c in enumerate(rep.configs, 1):
        p = c.params
        k = p.get("num_input_tokens")
        shape = f" ({p.get('num_layers')} layers / {p.get('context_dim')} dim / {k} token{'s' if k != 1 else ''})" if p.get("num_layers") else ""
        out += [f"### {i}. {c.name}{shape}", ""]
        samples = any(s.samples is not None for s in c.sizes)
        se = any(s.val_loss_se is not None for s in c.sizes)
        head = ("| Samples " if samples else "") + "| Tokens | Val PPL |" + (" 95% (per-token s.e.) |" if se else "") + " Val Acc | Val ER | Capped |"
        out += [head, "|---" * (head.count("|") - 1) + "|"]
        for s in c.sizes:
            iv = s.ppl_interval()
            out.append((f"| {s.samples} " if samples else "") + f"| {s.tokens:,} | {s.ppl:.1f} |" + (f" {iv[0]:.1f}–{iv[1]:.1f} |" if iv else (" - |" if se else ""))
                       + f" {_f(s.acc, pct=True)} | {_f(s.val_er, pct=True)} | {_capped_cell(s)} |")  # fmt: skip
        law = rep.laws.get(c.name)
        if law:
            how = "jackknife over sizes with the per-size standard errors" if law.measured_se else "jackknife over sizes"
            out += ["", f"**Scaling law**: PPL = {law.A:.4g} × tokens^{law.alpha:.4f}, α = {law.alpha:.4f} "
                        f"(95% interval [{_f(law.alpha_low)}, {_f(law.alpha_high)}], {how}; s.e. {_f(law.alpha_se)}), R² = {_f(law.r2)}; "
                        f"PPL at {short_count(law.target_tokens)} tokens {fmt_ppl(law.ppl_target)} [{fmt_ppl(law.ppl_target_low)}, {fmt_ppl(law.ppl_target_high)}]", ""]  # fmt: skip
        else:
            out.append("")
        for flag in rep.flags.get(c.name, []):
            out += [f"> ⚠ {c.name}: {flag}.", ""]

    out += ["## What α means", "", "Scaling law: `PPL = A × tokens^α`; 10× more tokens multiplies PPL by 10^α.", ""]
    for name, law in sorted(rep.laws.items(), key=lambda kv: kv[1].alpha):
        out.append(f"- {name}: α = {law.alpha:.4f} → 10× tokens multiplies PPL by {law.factor_per_10x:.3f} (to {100 * law.factor_per_10x:.0f}%); "
                   + ", ".join(f"PPL {law.ppl_at[t]:.1f} at {_short(t)} tokens" for t in GAP_TOKENS) + " by the fitted law")  # fmt: skip
    for g in rep.gaps:
        fitted = ", ".join(f"{100 * g.fitted[t]:+.1f}% at {_short(t)}" for t in GAP_TOKENS)
        alone = ", ".join(f"{100 * g.alpha_only[t]:.1f}% at {_short(t)}" for t in GAP_TOKENS)
        out += ["", f"**{g.a} vs {g.b}** (Δα = {g.d_alpha:+.4f}): their fitted laws put {g.a}'s PPL {fitted} relative to {g.b}'s. "
                    f"The slope difference alone, from equal PPL at {g.anchor_tokens:,} tokens (the median size), opens a gap of {alone}; "
                    "the gap grows with data."]  # fmt: skip
    far = [rep.caveats[short_count(t)] for t in GAP_TOKENS if short_count(t) in rep.caveats]
    if far:
        out += [""] + [f"> ⚠ Caveat: {c}." for c in far]

    out += ["", "## Rankings", ""]
    r = rep.rankings
    rejected = {c.name for c in rep.configs if not c.feasible}
    if rejected:
        out.append("Infeasible configs (marked †: infeasible or admitted early) are ranked after every feasible one.")
        out.append("")

    def name(x: dict[str, Any]) -> str:
        return x["config"] + (" †" if x["config"] in rejected else "")

    if r.get("best_ppl"):
        out.append("- Best absolute PPL (at its own size): " + ", ".join(f"{name(x)} ({x['ppl']:.1f} at {x['tokens']:,})" for x in r["best_ppl"]))
    if r.get("best_alpha"):
        out.append("- Best α (95% interval): " + ", ".join(f"{name(x)} ({x['alpha']:.4f} [{_f(x['alpha_low'])}, {_f(x['alpha_high'])}])" for x in r["best_alpha"]))
    if r.get("ppl_at_target"):
        t = r["ppl_at_target"][0]["target_tokens"]
        out.append(f"- Best PPL at {short_count(t)} tokens by the fitted law (95% interval): "
                   + ", ".join(f"{name(x)} ({fmt_ppl(x['ppl'])} [{fmt_ppl(x['low'])}, {fmt_ppl(x['high'])}])" for x in r["ppl_at_target"]))  # fmt: skip
        if "target" in rep.caveats:
            out.append(f"  ⚠ Caveat: {rep.caveats['target']}.")
    if r.get("cost_performance"):
        front = r["cost_performance"]
        what = "parameters" if front[0]["count"] == "total" else "phase-1 parameters"
        out.append(f"- Parameters-PPL front at {front[0]['tokens']:,} tokens ({what}; ★ the fewest within "
                   f"{100 * front[0]['tolerance']:.0f}% of the best PPL): "
                   + ", ".join(f"{x['config']}{' ★' if x['pick'] else ''} ({x['params'] / 1e6:.2f}M, {x['ppl']:.1f}, {100 * x['ppl_vs_best']:+.1f}%)"
                               for x in front))  # fmt: skip
    with_iv = {n for n, law in rep.laws.items() if has_interval(law)}
    pairs = [(a, b) for a, b in rep.overlaps if a in with_iv and b in with_iv]
    if pairs:
        out.append("- Overlapping α intervals: " + ", ".join(f"{a} / {b}" for a, b in pairs))
    if len(with_iv) < len(rep.laws):
        out.append(f"- α without an interval ({NO_INTERVAL}): " + ", ".join(n for n in rep.laws if n not in with_iv))
    labels = {"best_ppl": "Best PPL (per-size standard errors)", "best_alpha": "Best α", "ppl_at_target": "Best PPL at target"}
    for key, rows in rep.resolved.items():
        apart = [x["other"] for x in rows if x["resolved"]]
        close = [x["other"] for x in rows if not x["resolved"]]
        out.append(f"- {labels[key]}, {rows[0]['leader']}: resolved against {', '.join(apart) or 'none'}; not resolved against {', '.join(close) or 'none'}")
    if rep.pareto:
        out += ["", "## Pareto front", "", "| Config | " + " | ".join(rep.pareto[0]["values"]) + " | PPL at target 95% | Total params |",
                "|---" * (len(rep.pareto[0]["values"]) + 3) + "|"]  # fmt: skip
        for p in rep.pareto:
            out.append(f"| {p['config']} | " + " | ".join(_f(v, '.4g') for v in p["values"].values())
                       + f" | {fmt_ppl(p['ppl_target_low'])}–{fmt_ppl(p['ppl_target_high'])} | {_m(p['total_params'])} |")  # fmt: skip
    er = rep.er_relation
    if er.get("rows"):
        out += ["", "## Effective rank and PPL", ""]
        if er.get("spearman") is not None:
            rho = er["spearman"]
            trend = "higher ER goes with lower PPL" if rho < 0 else "higher ER goes with higher PPL"
            out.append(f"Validation ER against PPL at each config's largest size: Spearman ρ = {rho:+.2f} over {len(er['rows'])} configs ({trend}).")
            out.append("")
        out += [f"- {x['config']}: ER {100 * x['val_er']:.1f}% → PPL {x['ppl']:.1f} at {x['tokens']:,} tokens" for x in er["rows"]]
    if rep.conclusions:
        out += ["", "## Conclusion", "", "| Criterion | Best config | Why (numbers) |", "|---|---|---|"]
        out += [f"| {c['criterion']} | {c['config']} | {c['reason']} |" for c in rep.conclusions]
    out += ["", "## Recommendation", ""] + [f"- {x}" for x in rep.recommendation]

    if comparison is not None and not comparison:
        out += ["", f"## Comparison with {compare_label}", "", "No config of this study has a counterpart there (configs are matched by name)."]
    if comparison:
        out += ["", f"## Comparison with {compare_label}", "",
                "| Config | α | α (ref) | Δα | R² | R² (ref) | Best PPL | Best PPL (ref) | ΔPPL | Best Acc | Best Acc (ref) | Val ER | Val ER (ref) | P1 iterations | P1 iterations (ref) |",
                "|---" * 15 + "|"]  # fmt: skip
        for c in comparison:
            out.append(f"| {c['config']} | {_f(c['alpha'])} | {_f(c['alpha_ref'])} | {_f(c['d_alpha'], '+.4f')} | {_f(c['r2'])} | {_f(c['r2_ref'])} | "
                       f"{c['best_ppl']:.1f} | {c['best_ppl_ref']:.1f} | {c['d_ppl']:+.1f} ({100 * c['d_ppl_rel']:+.1f}%) | "
                       f"{_f(c['best_acc'], pct=True)} | {_f(c['best_acc_ref'], pct=True)} | {_f(c['val_er'], pct=True)} | {_f(c['val_er_ref'], pct=True)} | "
                       f"{_iters(c['phase1_iterations'])} | {_iters(c['phase1_iterations_ref'])} |")  # fmt: skip
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


def _family_section(rep: Report) -> list[str]:
    """Families side by side: alpha with its interval, R^2, best PPL and parameters per config,
    then the configs of different families at matched parameter counts."""
    if not rep.families:
        return []
    out = ["", "## By family", "", "| Family | Config | Params | α | 95% interval | R² | Best PPL |", "|---|---|---|---|---|---|---|"]
    for r in rep.families:
        out.append(f"| {r['family']} | {r['config']} | {_m(r['total_params'])} | {_f(r['alpha'])} | "
                   f"[{_f(r['alpha_low'])}, {_f(r['alpha_high'])}] | {_f(r['r2'])} | {r['best_ppl']:.1f} |")  # fmt: skip
    if rep.matched:
        out += ["", "Matched parameter counts (trainable parameters within 5 %):", "",
                "| Params | Config | α [95%] | Best PPL | vs | α [95%] | Best PPL | Δα | PPL ratio | α intervals |",
                "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for m in rep.matched:
            a, b = m["a"], m["b"]
            overlap = "-" if m["alpha_overlap"] is None else ("overlap (not resolved)" if m["alpha_overlap"] else "disjoint")
            out.append(f"| {_m(a['total_params'])} / {_m(b['total_params'])} | {a['config']} | {_f(a['alpha'])} [{_f(a['alpha_low'])}, {_f(a['alpha_high'])}] | "
                       f"{a['best_ppl']:.1f} | {b['config']} | {_f(b['alpha'])} [{_f(b['alpha_low'])}, {_f(b['alpha_high'])}] | {b['best_ppl']:.1f} | "
                       f"{_f(m['d_alpha'], '+.4f')} | {m['ppl_ratio']:.3f} | {overlap} |")  # fmt: skip
    return out


def summary_table(rep: Report) -> list[str]:
    out = ["## Summary", "", "| Config | Phase1 Params | α (slope) | α 95% | R² | Best PPL | at tokens | Best Acc | Val ER | PPL at target 95% | Flags |",
           "|---" * 11 + "|"]  # fmt: skip
    best_alpha = min((r.alpha for r in rep.summary if r.alpha is not None), default=None)
    best_ppl = min((r.best_ppl for r in rep.summary), default=None)
    for r in rep.summary:
        a = _f(r.alpha)
        p = f"{r.best_ppl:.1f}"
        target = "-" if r.ppl_target is None else f"{fmt_ppl(r.ppl_target)} [{fmt_ppl(r.ppl_target_low)}, {fmt_ppl(r.ppl_target_high)}]"
        out.append(f"| {r.config} | {_m(r.phase1_params)} | {'**' + a + '**' if r.alpha == best_alpha else a} | "
                   f"{'-' if r.alpha_low is None else f'[{_f(r.alpha_low)}, {_f(r.alpha_high)}]'} | {_f(r.r2)} | "
                   f"{'**' + p + '**' if r.best_ppl == best_ppl else p} | {r.best_tokens:,} | {_f(r.best_acc, pct=True)} | {_f(r.val_er, pct=True)} | "
                   f"{target} | {', '.join(r.flags) or '-'} |")  # fmt: skip
    if any(r.flags for r in rep.summary):
        out += ["", "Flags: `α∋0` the α interval contains 0; `α>0` PPL rises with data (α above 0); `capped` the fit rests on runs that hit a training cap; "
                    "`infeasible` the study's admissibility or capped rule rejected it; `admitted early` the admissibility rule "
                    "admitted it against the best so far, not against the study's final best (ranked as infeasible); "
                    "`retried` some sizes were trained again with raised caps; `fp32`, `bf16`, ... the runs' arithmetic, "
                    "shown where the configs' differ."]  # fmt: skip
    if "target" in rep.caveats:
        out += ["", f"⚠ PPL at target: {rep.caveats['target']}."]
    if "below_1" in rep.caveats:
        out += ["", f"⚠ PPL at target: {rep.caveats['below_1']}."]
    return out + [""]


def series(rep: Report) -> list[ScalingSeries]:
    out = []
    for c in rep.configs:
        law = rep.laws.get(c.name)
        tokens, ppl = [s.tokens for s in c.sizes], [s.ppl for s in c.sizes]
        if law is None:
            out.append(ScalingSeries(c.name, tokens, ppl))
        else:
            out.append(ScalingSeries(c.name, tokens, ppl, law.alpha, law.A, law.alpha_low, law.alpha_high, law.loo_alphas, law.loo_intercepts))
    return out


def plot_alpha_vs_params(rep: Report, path: Path) -> Path:
    fig, ax = _figure()
    for i, r in enumerate(rep.summary):
        law = rep.laws.get(r.config)
        if law is None or r.phase1_params is None:
            continue
        lo = law.alpha - law.alpha_low if math.isfinite(law.alpha_low) else 0
        hi = law.alpha_high - law.alpha if math.isfinite(law.alpha_high) else 0
        ax.errorbar([r.phase1_params / 1e6], [law.alpha], yerr=[[lo], [hi]], fmt="o", color=f"C{i % 10}", capsize=4, label=r.config)
    ax.set_xlabel("phase-1 parameters (M)")
    ax.set_ylabel("α (95% jackknife interval)")
    ax.set_title("α against phase-1 parameters (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def pareto_points(rep: Report, study) -> tuple[list, list]:
    """(every COMPLETE trial, the front) of a two-objective study as the Pareto plot draws them:
    repeats (a config's value told again) are no points of their own; the front is the report's
    (feasible configs, admitted-early ones out), as its table lists it, else Optuna's."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.user_attrs.get("repeat_of") is None]
    best = {p["trial"] for p in rep.pareto if p.get("trial") is not None} or {t.number for t in study.best_trials}
    return trials, [t for t in trials if t.number in best]


def plot_pareto(rep: Report, study, path: Path) -> Path | None:
    """Multi-objective studies: every COMPLETE trial, the Pareto set highlighted."""
    trials, front = pareto_points(rep, study)
    if len(study.directions) != 2 or not trials:
        return None
    names = rep.meta.get("objectives", ["objective 0", "objective 1"])
    fig, ax = _figure()
    xs = [t.values[0] for t in trials]
    ys = [t.values[1] for t in trials]
    ax.scatter(xs, ys, color="C7", label="trials")
    px = [t.values[0] for t in front]
    py = [t.values[1] for t in front]
    ax.scatter(px, py, color="C3", label="Pareto set")
    if str(names[0]).startswith("ppl_at"):  # the front's extrapolated PPLs with their 95% intervals
        lo = [max(0.0, t.values[0] - (t.user_attrs.get("ppl_at_target_low") or t.values[0])) for t in front]
        hi = [max(0.0, (t.user_attrs.get("ppl_at_target_high") or t.values[0]) - t.values[0]) for t in front]
        ax.errorbar(px, py, xerr=[lo, hi], fmt="none", ecolor="C3", alpha=0.6, capsize=3)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title("Pareto front")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_search(study, out: Path) -> list[Path]:
    """Optimisation history and parameter importances of a search (single objective)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import optuna

    paths = []
    if len(study.directions) != 1:
        return paths
    plots = {"history.png": optuna.visualization.matplotlib.plot_optimization_history,
             "importances.png": optuna.visualization.matplotlib.plot_param_importances}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, draw in plots.items():
            try:
                ax = draw(study)
            except Exception:  # e.g. importances of too few finished trials
                continue
            ax.figure.set_size_inches(6.4, 4.4)
            paths.append(save(ax.figure, out / name))
    return paths


def runs_rows(rep: Report) -> list[dict[str, Any]]:
    rows = []
    for c in rep.configs:
        for s in c.sizes:
            rows.append({"config": c.name, "family": c.family, "trial": c.number, **{k: v for k, v in c.params.items()}, "phase1_params": c.phase1_params,
                         "samples": s.samples, "tokens": s.tokens, "val_ppl": s.ppl, "val_acc": s.acc, "val_er": s.val_er,
                         "train_er": s.train_er, "phase1_iterations": s.phase1_iterations,
                         "val_loss": s.val_loss, "val_loss_se": s.val_loss_se, "capped": ";".join(s.capped),
                         "retried": ";".join(f"{k}={v}" for k, v in s.retried.items()), "precision": s.precision,
                         "seeds": ";".join(map(str, s.seeds)), "val_ppl_seeds": ";".join(repr(float(p)) for p in s.val_ppl_seeds)})  # fmt: skip
    return rows


def write_report(rep: Report, out: Path, study=None, reference: Report | None = None, reference_label: str = "") -> list[Path]:
    """report.md, summary.json, runs.csv and the PNG plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots = []
    if rep.configs:
        plots.append(plot_scaling(series(rep), out / "scaling.png", title="Validation PPL vs training tokens (fitted laws, jackknife bands)"))
        plots.append(plot_alpha_vs_params(rep, out / "alpha_vs_params.png"))
    if study is not None:
        p = plot_pareto(rep, study, out / "pareto.png")
        if p:
            plots.append(p)
        if rep.meta.get("sampler") not in (None, "grid"):
            plots += plot_search(study, out)
    comparison = compare(rep, reference) if reference is not None else None
    (out / "report.md").write_text(markdown(rep, comparison, reference_label, [str(p) for p in plots]))
    summary = rep.to_dict()
    if comparison is not None:
        summary["comparison"] = {"with": reference_label, "rows": comparison}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    rows = runs_rows(rep)
    with (out / "runs.csv").open("w", newline="") as f:
        cols = list(dict.fromkeys(k for r in rows for k in r)) or ["config"]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    written += [out / "report.md", out / "summary.json", out / "runs.csv", *plots]
    return written


class PlotlyFigure(dict):
    """A plotly figure as its JSON document (``data``: traces, ``layout``), written without
    the plotly package: optuna-dashboard stores a figure as ``figure.to_json()`` and draws it
    with plotly.js in the browser, so this one graph needs no Python plotting library."""

    def to_json(self) -> str:
        return json.dumps(self, allow_nan=False)


def plotly_scaling(rep: Report) -> PlotlyFigure:
    """The log-log plot as a plotly figure (a study-level graph in optuna-dashboard)."""
    import numpy as np

    traces = []
    for i, s in enumerate(series(rep)):
        color = f"hsl({(i * 67) % 360},60%,45%)"
        traces.append({"type": "scatter", "x": [float(t) for t in s.tokens], "y": [float(p) for p in s.ppl],
                       "mode": "markers", "name": s.label, "marker": {"color": color}, "legendgroup": s.label})  # fmt: skip
        if s.alpha is not None:
            x = np.geomspace(min(s.tokens) / 1.3, max(s.tokens) * 1.3, 50)
            b = band(s, x)
            if b is not None:  # the jackknife band: lower edge, then the upper edge filled down to it
                ci = f" [{s.alpha_low:.3f}, {s.alpha_high:.3f}]" if s.alpha_low is not None and math.isfinite(s.alpha_low) else ""
                traces.append({"type": "scatter", "x": x.tolist(), "y": b[0].tolist(), "mode": "lines", "line": {"width": 0, "color": color},
                               "showlegend": False, "legendgroup": s.label, "hoverinfo": "skip"})  # fmt: skip
                traces.append({"type": "scatter", "x": x.tolist(), "y": b[1].tolist(), "mode": "lines", "line": {"width": 0, "color": color},
                               "fill": "tonexty", "fillcolor": f"hsla({(i * 67) % 360},60%,45%,0.15)", "name": f"{s.label}: 95% band{ci}",
                               "legendgroup": s.label, "hoverinfo": "skip"})  # fmt: skip
            traces.append({"type": "scatter", "x": x.tolist(), "y": (s.A * x**s.alpha).tolist(), "mode": "lines",
                           "name": f"{s.label}: α = {s.alpha:.3f}", "line": {"color": color}, "legendgroup": s.label})  # fmt: skip
    layout = {"title": {"text": "Validation PPL vs training tokens (fitted laws, jackknife bands)"},
              "xaxis": {"type": "log", "title": {"text": "training tokens"}}, "yaxis": {"type": "log", "title": {"text": "validation PPL"}},
              "legend": {"orientation": "h", "yanchor": "top", "y": -0.3}}  # fmt: skip
    return PlotlyFigure(data=traces, layout=layout)


def summary_note(rep: Report) -> str:
    """The header, summary table, flags and recommendation as a study note for optuna-dashboard."""
    out = [f"# {rep.title}", ""] + header(rep) + protocol_lines(rep) + summary_table(rep) + _family_section(rep)
    for name, flags in rep.flags.items():
        out += [f"- ⚠ {name}: {f}" for f in flags]
    out += ["", "## Recommendation", ""] + [f"- {x}" for x in rep.recommendation]
    return "\n".join(out) + "\n"
