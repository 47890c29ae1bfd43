"""What a researcher reads of one trial: its per-size table (the dashboard's CSV, the trackers'
table) and its note in optuna-dashboard (pure: no Optuna, no Ray)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from archsearch.result import SizeRecord

FIRST = ("size", "train_tokens", "val_ppl", "val_ppl_low", "val_ppl_high", "val_acc", "val_er", "train_er",
         "val_loss", "val_loss_se", "phase1_iterations", "phase2_best_epoch", "seconds", "cached")  # fmt: skip
"""Columns that lead the per-size table, PPL among the first; the rest follow, and columns
whose value is the same on every row (units, device, counts) go last."""


def size_rows(records: Sequence[SizeRecord]) -> list[dict[str, Any]]:
    """One flat row per size, in :data:`FIRST` order, constant columns at the end."""
    rows = []
    for r in records:
        low, high = r.ppl_interval()
        row: dict[str, Any] = {
            "size": r.size, "size_unit": r.size_unit, "train_tokens": r.train_tokens, "val_tokens": r.val_tokens,
            "val_ppl": r.val_ppl, "val_ppl_low": low, "val_ppl_high": high, "val_acc": r.val_acc,
            "val_loss": r.val_loss, "val_loss_se": r.val_loss_se, "seconds": r.seconds, "cached": r.cached,
        }  # fmt: skip
        row.update(r.metrics)
        row.update({f"{k}_seconds": v for k, v in r.phase_seconds.items()})
        row.update({f"{k}_params": v for k, v in r.params.items()})
        row.update(device=r.device, precision=r.precision, seeds=" ".join(map(str, r.seeds)), capped=" ".join(r.capped))
        rows.append(row)
    if not rows:
        return rows
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lead = [k for k in FIRST if k in keys]
    rest = [k for k in keys if k not in lead]
    constant = [k for k in rest if len(rows) > 1 and len({repr(row.get(k)) for row in rows}) == 1]
    order = lead + [k for k in rest if k not in constant] + constant
    return [{k: row.get(k) for k in order} for row in rows]


def _f(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def trial_note(number: int, name: str, state: str, params: dict[str, Any], records: Sequence[SizeRecord],
               fit: dict[str, Any] | None, target_tokens: float, plot_url: str | None = None,
               reason: str | None = None, flags: Sequence[str] = ()) -> str:  # fmt: skip
    """The trial's note (Markdown): config, alpha +- interval, PPL at ``target_tokens`` +-
    interval, its flags (capped runs, an alpha interval containing 0, infeasible), the plot
    (click: full size), the per-size table with PPL first (capped sizes marked)."""
    out = [f"## {name}", "", f"Trial {number}, {state}" + (f": {reason}" if reason else "") + ".", ""]
    if params:
        out += ["Params: " + ", ".join(f"`{k}` = {v}" for k, v in params.items()), ""]
    if fit and fit.get("alpha") is not None:
        out.append(f"**α = {_f(fit['alpha'])}** (95% interval [{_f(fit.get('alpha_low'))}, {_f(fit.get('alpha_high'))}]), "
                   f"A = {_f(fit.get('A'), '.4g')}, R² = {_f(fit.get('r2'))}, over {len(records)} sizes")  # fmt: skip
        ex = _extrapolate(records, target_tokens)
        if ex is not None:
            out.append("")
            out.append(f"**PPL at {target_tokens:,.0f} tokens = {ex.ppl:.1f}** (95% interval [{_f(ex.low, '.4g')}, {_f(ex.high, '.4g')}]), by the fitted law")
        out.append("")
    if flags:
        out += ["**Flags:**", "", *(f"- ⚠ {f}" for f in flags), ""]
    if plot_url:
        out += [f"[![PPL vs training tokens]({plot_url})]({plot_url})", "", f"[open the plot full size]({plot_url})", ""]
    if records:
        out += ["| Tokens | Val PPL | PPL 95% | Val Acc | Val ER | Train ER | P1 iters | Seconds | Capped |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in records:
            low, high = r.ppl_interval()
            ppl_ci = f"[{low:.1f}, {high:.1f}]" if math.isfinite(low) else "-"
            m = r.metrics
            out.append(f"| {r.train_tokens:,} | {r.val_ppl:.1f} | {ppl_ci} | {_f(100 * r.val_acc, '.1f')}% | "
                       f"{_pct(m.get('val_er'))} | {_pct(m.get('train_er'))} | {_f(m.get('phase1_iterations'), 'g')} | "
                       f"{r.seconds:.1f}{' (cached)' if r.cached else ''} | {', '.join(r.capped) or '-'} |")  # fmt: skip
    return "\n".join(out) + "\n"


def capped_text(records: Sequence[SizeRecord]) -> list[str]:
    """"<size> <unit>: <flag>, ..." for every size whose runs hit a training cap."""
    return [f"{r.size:,} {r.size_unit}: {', '.join(r.capped)}" for r in records if r.capped]


def note_flags(records: Sequence[SizeRecord], fit: dict[str, Any] | None, infeasible: str | None) -> list[str]:
    """What the trial's dashboard note warns about, as the report does: sizes whose runs hit a
    training cap (and those trained again with raised caps), an α interval that contains 0, and
    why the trial is infeasible."""
    flags = []
    capped = capped_text(records)
    if capped:
        flags.append("capped: " + "; ".join(capped) + ". Its α and extrapolations rest on runs cut off while still improving")
    retried = [f"{r.size:,} {r.size_unit} ({', '.join(f'{k}={v}' for k, v in r.retried.items())})" for r in records if r.retried]
    if retried:
        flags.append("trained again with raised caps: " + "; ".join(retried))
    low, high = (fit or {}).get("alpha_low"), (fit or {}).get("alpha_high")
    if low is not None and high is not None and low <= 0 <= high:
        flags.append(f"α interval [{low:.4f}, {high:.4f}] contains 0: these sizes do not show its PPL falling with data")
    elif (fit or {}).get("alpha") is not None and fit["alpha"] > 0:
        flags.append(f"α = {fit['alpha']:+.4f} above 0: its PPL rises with more data at these sizes")
    if infeasible:
        flags.append(f"infeasible: {infeasible}")
    return flags


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _extrapolate(records: Sequence[SizeRecord], target: float):
    from archsearch.errors import FitError
    from archsearch.scaling import fit_power_law

    try:
        # as the trial fits them (trial.fit_sizes) and the report does: with the per-size standard errors
        return fit_power_law([r.train_tokens for r in records], [r.val_ppl for r in records],
                             ln_se=[r.val_loss_se for r in records]).extrapolate(target)  # fmt: skip
    except FitError:
        return None
