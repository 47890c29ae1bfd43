"""Where report data comes from: a study (through Optuna) or a file of published numbers."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from archsearch.report.data import ConfigResult, SizeRow
from archsearch.result import SizeRecord

REFERENCE = Path(__file__).resolve().parent / "reference" / "report_000.json"
"""The report's published numbers, package data: installed with archsearch (wheel or editable)."""


def from_reference(path: str | Path = REFERENCE) -> tuple[list[ConfigResult], dict[str, Any]]:
    """The report's published per-size numbers (archsearch/report/reference/report_000.json)."""
    doc = json.loads(Path(path).read_text())
    configs = []
    for name, rows in doc["sizes"].items():
        summary = doc["summary"].get(name, {})
        configs.append(ConfigResult(
            name=name,
            params=doc["configs"].get(name, {}),
            phase1_params=round(summary["phase1_params_m"] * 1e6) if "phase1_params_m" in summary else None,
            sizes=[SizeRow(tokens=r["tokens"], ppl=r["ppl"], acc=r.get("acc"), val_er=r.get("val_er"), samples=r.get("samples")) for r in rows],
            embed_dim=doc.get("embed_dim"),
            extra={"phase1_iterations": doc.get("phase1_iterations", {}).get(name)},
        ))  # fmt: skip
    return configs, {"title": doc.get("title"), "source": doc.get("source"), "kind": "published"}


def size_row(s: dict[str, Any]) -> SizeRow:
    """A report row from one entry of a trial's "sizes" attribute (SizeRecord.to_dict(), or the
    flat form of older studies, which SizeRecord.from_dict converts)."""
    rec = SizeRecord.from_dict(s)
    se = rec.val_loss_se if rec.val_loss_se is not None and math.isfinite(rec.val_loss_se) else None
    return SizeRow(tokens=rec.train_tokens, ppl=rec.val_ppl, acc=rec.val_acc, val_er=rec.metrics.get("val_er"),
                   samples=rec.size if rec.size_unit == "samples" else None, train_er=rec.metrics.get("train_er"),
                   phase1_iterations=rec.metrics.get("phase1_iterations"), val_loss_se=se, capped=list(rec.capped),
                   phase1_convergence_rate=rec.metrics.get("phase1_convergence_rate"),
                   best_epoch=rec.metrics.get("phase2_best_epoch"), precision=rec.precision or None, device=rec.device or None,
                   retried=dict(rec.retried or {}), val_loss=_finite_or_none(rec.val_loss),
                   seeds=list(rec.seeds or []), val_ppl_seeds=list(rec.val_ppl_seeds or []))  # fmt: skip


def _finite_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def from_study(study, storage_label: str = "") -> tuple[list[ConfigResult], dict[str, Any]]:
    """The study's COMPLETE trials as configs (pruned and failed ones are counted in meta).
    Repeats (a proposal of a config already evaluated, answered from the study: user attr
    ``repeat_of``) are counted, never reported as configs of their own."""
    import datetime

    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    repeats = [t for t in trials if t.user_attrs.get("repeat_of") is not None]
    counts = Counter(t.state.name for t in trials)
    configs, names = [], Counter()
    for t in trials:
        if t.state != TrialState.COMPLETE or not t.user_attrs.get("sizes") or t.user_attrs.get("repeat_of") is not None:
            continue
        name = t.user_attrs.get("config_name") or f"trial_{t.number}"
        names[name] += 1
        if names[name] > 1:
            name = f"{name}#{t.number}"
        sizes = t.user_attrs["sizes"]
        configs.append(ConfigResult(
            name=name,
            params=dict(t.params),
            phase1_params=t.user_attrs.get("phase1_params"),
            phase2_params=t.user_attrs.get("phase2_params"),
            sizes=[size_row(s) for s in sizes],
            embed_dim=SizeRecord.from_dict(sizes[0]).metrics.get("embed_dim"),
            state="COMPLETE",
            number=t.number,
            values=list(t.values or []),
            extra={k: t.user_attrs.get(k) for k in ("device", "wall_seconds", "alpha_low", "alpha_high", "admissibility")},
            family=t.user_attrs.get("family") or SizeRecord.from_dict(sizes[0]).family,
            total_params=t.user_attrs.get("total_params"),
            infeasible=t.user_attrs.get("infeasible"),
            model=t.user_attrs.get("model"),
        ))  # fmt: skip
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("repeat_of") is None]
    meta = {
        "kind": "study",
        "study": study.study_name,
        "storage": storage_label,
        "objectives": study.user_attrs.get("objectives") or study.metric_names or [d.name.lower() for d in study.directions],
        "directions": [d.name.lower() for d in study.directions],
        "sampler": study.user_attrs.get("sampler"),
        "data_source": study.user_attrs.get("data_source"),
        "sizes": study.user_attrs.get("sizes"),
        "size_unit": study.user_attrs.get("size_unit"),
        "trial_counts": dict(counts),
        "repeats": len(repeats),
        "runs": study.user_attrs.get("runs") or [],
        "report_date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": sum(t.user_attrs.get("wall_seconds") or 0 for t in complete),
        "devices": sorted({t.user_attrs.get("device") for t in complete if t.user_attrs.get("device")}),
        "pareto": [t.number for t in study.best_trials] if len(study.directions) > 1 and complete else [],
    }
    return configs, meta
