"""Where report data comes from: a study (through Optuna) or a file of published numbers."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from archsearch.errors import ConfigError, shown
from archsearch.report.data import ConfigResult, SizeRow
from archsearch.result import SizeRecord

REFERENCE = Path(__file__).resolve().parent / "reference" / "report_000.json"
"""The report's published numbers, package data: installed with archsearch (wheel or editable)."""


REFERENCE_MAX_BYTES = 16 * 2**20
"""Largest file ``report --compare FILE`` reads (the shipped one is 3 KB)."""


def _number(value: Any, positive: bool = True) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0


def reference_problems(doc: Any) -> list[str]:
    """What is wrong with a file of published numbers (the form of report_000.json): every
    problem, by its key; [] when it is usable."""
    if not isinstance(doc, dict):
        return [f"expected a JSON object with 'sizes', got {shown(doc)}"]
    problems = []
    for key in ("summary", "configs", "phase1_iterations"):
        if key in doc and not isinstance(doc[key], dict):
            problems.append(f"{key}: expected an object by config name, got {shown(doc[key])}")
    for key in ("title", "source"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            problems.append(f"{key}: expected text, got {shown(doc[key])}")
    if doc.get("embed_dim") is not None and not (isinstance(doc["embed_dim"], int) and _number(doc["embed_dim"])):
        problems.append(f"embed_dim: expected a whole number > 0, got {shown(doc['embed_dim'])}")
    sizes = doc.get("sizes")
    if not isinstance(sizes, dict) or not sizes:
        return problems + [f"sizes: expected an object of config name -> list of sizes, got {shown(sizes)}"]
    summaries = doc.get("summary") if isinstance(doc.get("summary"), dict) else {}
    for name, rows in sizes.items():
        where = f"sizes.{shown(name, 60).strip(chr(39))}"
        if not isinstance(rows, list) or not rows:
            problems.append(f"{where}: expected a non-empty list of {{tokens, ppl, ...}}, got {shown(rows)}")
            continue
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                problems.append(f"{where}[{i}]: expected an object {{tokens, ppl, ...}}, got {shown(row)}")
                continue
            for key in ("tokens", "ppl"):
                if not _number(row.get(key)):
                    problems.append(f"{where}[{i}].{key}: expected a finite number > 0, got {shown(row.get(key))}")
            for key in ("acc", "val_er"):
                if row.get(key) is not None and not _number(row[key], positive=False):
                    problems.append(f"{where}[{i}].{key}: expected a finite number >= 0, got {shown(row[key])}")
            if row.get("samples") is not None and not (isinstance(row["samples"], int) and _number(row["samples"])):
                problems.append(f"{where}[{i}].samples: expected a whole number > 0, got {shown(row['samples'])}")
        summary = summaries.get(name, {})
        if not isinstance(summary, dict):
            problems.append(f"summary.{shown(name, 60).strip(chr(39))}: expected an object, got {shown(summary)}")
        elif "phase1_params_m" in summary and not _number(summary["phase1_params_m"]):
            problems.append(f"summary.{shown(name, 60).strip(chr(39))}.phase1_params_m: expected a finite number > 0, got {shown(summary['phase1_params_m'])}")
    configs = doc.get("configs") if isinstance(doc.get("configs"), dict) else {}
    for name, params in configs.items():
        if not isinstance(params, dict):
            problems.append(f"configs.{shown(name, 60).strip(chr(39))}: expected an object of parameters, got {shown(params)}")
    return problems


def read_reference(path: str | Path) -> dict[str, Any]:
    """A file of published numbers, read and checked: a file that is too large, not UTF-8,
    not JSON (or nested too deeply to parse) or not of report_000.json's form is a
    :class:`~archsearch.errors.ConfigError` naming it and every problem, never a traceback."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > REFERENCE_MAX_BYTES:
            raise ConfigError(f"{size:,} bytes; a file of published numbers may have at most {REFERENCE_MAX_BYTES:,}", source=str(path))
        with open(path, "rb") as f:
            raw = f.read(REFERENCE_MAX_BYTES + 1)
        doc = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read it ({e.strerror or e})", source=str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", source=str(path)) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"not JSON ({e.msg} at line {e.lineno}, column {e.colno})", source=str(path)) from None
    except RecursionError:
        raise ConfigError("not usable JSON (nested too deeply)", source=str(path)) from None
    problems = reference_problems(doc)
    if problems:
        raise ConfigError(problems, source=str(path))
    return doc


def from_reference(path: str | Path = REFERENCE) -> tuple[list[ConfigResult], dict[str, Any]]:
    """The report's published per-size numbers (archsearch/report/reference/report_000.json),
    or a file of the same form (checked: :func:`read_reference`)."""
    doc = read_reference(path)
    configs = []
    summaries, params = doc.get("summary") or {}, doc.get("configs") or {}
    for name, rows in doc["sizes"].items():
        summary = summaries.get(name, {})
        configs.append(ConfigResult(
            name=name,
            params=params.get(name, {}),
            phase1_params=round(summary["phase1_params_m"] * 1e6) if "phase1_params_m" in summary else None,
            sizes=[SizeRow(tokens=r["tokens"], ppl=r["ppl"], acc=r.get("acc"), val_er=r.get("val_er"), samples=r.get("samples")) for r in rows],
            embed_dim=doc.get("embed_dim"),
            extra={"phase1_iterations": (doc.get("phase1_iterations") or {}).get(name)},
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
