"""Terminal rendering shared by the commands (rich tables, progress)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from archsearch.result import SizeRecord

# In a log or a pipe (no terminal), rich would wrap at 80 columns and split table cells.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def fmt_count(n: float | int | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    n = float(n)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:g}"


def fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def data_progress(quiet: bool = False) -> Callable[[str], None] | None:
    """What prepare_space_data says, printed to stderr (None with ``quiet``)."""
    if quiet:
        return None
    return lambda msg: err_console.print(f"[dim]data:[/dim] {msg}")


def sizes_table(records: list[SizeRecord], title: str | None = None) -> Table:
    samples = bool(records) and records[0].size_unit == "samples"
    t = Table(title=title)
    for col in (*(("Samples",) if samples else ()), "Tokens", "Val PPL", "Val Acc", "Train ER", "Val ER", "P1 it", "P1 conv", "P2 best/stop", "P1 s", "P2 s", "Capped", "Cached"):
        t.add_column(col, justify="right")
    for r in records:
        m = r.metrics
        t.add_row(
            *((f"{r.size:,}",) if samples else ()),
            f"{r.train_tokens:,}",
            f"{r.val_ppl:.1f}",
            f"{100 * r.val_acc:.1f}%",
            fmt(m.get("train_er"), ".1%"),  # CVFP's numbers; "-" for a family without them
            fmt(m.get("val_er"), ".1%"),
            fmt(m.get("phase1_iterations"), "g"),
            fmt(m.get("phase1_convergence_rate"), ".1%"),
            # CVFP's phase-2 epochs; another family's (gpt, lstm: best_epoch / stopped_epoch) and training seconds
            f"{fmt(m.get('phase2_best_epoch', m.get('best_epoch')), 'g')}/{fmt(m.get('phase2_stopped_epoch', m.get('stopped_epoch')), 'g')}",
            fmt(r.phase_seconds.get("phase1"), ".1f"),
            fmt(r.phase_seconds.get("phase2", r.phase_seconds.get("train")), ".1f"),
            ", ".join(r.capped),
            "yes" if r.cached else "",
        )
    return t


def fit_lines(fit: dict[str, Any] | None) -> list[str]:
    if not fit:
        return ["scaling law: needs at least two sizes"]
    lines = [
        f"scaling law: PPL = {fit['A']:.4g} * tokens^{fit['alpha']:.4f}   (R^2 = {fmt(fit['r2'], '.4f')}, n = {fit['n_sizes']})",
        f"alpha = {fit['alpha']:.4f} +- {fmt(fit['alpha_se'], '.4f')} (OLS s.e.);  "
        f"{100 * fit['level']:.0f}% interval [{fmt(fit['alpha_low'], '.4f')}, {fmt(fit['alpha_high'], '.4f')}] ({fit['ci_method']})",
        f"10x more tokens multiplies PPL by {10 ** fit['alpha']:.3f}",
    ]
    if fit.get("target_tokens"):
        lines.append(
            f"PPL at {fmt_count(fit['target_tokens'])} tokens: {fit['ppl_at_target']:.1f} "
            f"[{fmt(fit['ppl_at_target_low'], '.1f')}, {fmt(fit['ppl_at_target_high'], '.1f')}]"
        )
    return lines
