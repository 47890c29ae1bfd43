"""A finished trial's views for optuna-dashboard: its log-log plot (PNG) and per-size table (CSV).

``archsearch run`` hands :class:`TrialArtifacts` to the study bridge as its artifacts callback;
the bridge calls it once per finished (COMPLETE or PRUNED) trial and records a failure as the
trial's ``artifact_error``, never as a failed trial (the views are of numbers the study keeps).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

from archsearch.report.plots import ScalingSeries, plot_scaling


_NESTED = {"params": "{}_params", "phase_seconds": "{}_seconds", "metrics": "{}"}
"""How a per-size record's mappings become columns: params.phase1 -> phase1_params, ..."""


def size_rows(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-size records (``SizeRecord.to_dict()`` form, or the flat dicts of older
    studies) as flat table rows: scalar fields first, then parameter counts, phase seconds
    and metrics as columns of their own (``phase1_params``, ``phase2_seconds``, ``val_er``),
    ``capped`` joined; other lists (per-seed values, histories) are left out."""
    rows = []
    for rec in sizes:
        row: dict[str, Any] = {k: v for k, v in rec.items() if not isinstance(v, (list, dict))}
        for key, column in _NESTED.items():
            row.update({column.format(k): v for k, v in (rec.get(key) or {}).items() if not isinstance(v, (list, dict))})
        if isinstance(rec.get("capped"), list):
            row["capped"] = " ".join(rec["capped"])
        rows.append(row)
    return rows


def write_trial_files(folder: Path, number: int, name: str, result: dict[str, Any]) -> list[tuple[Path, str]]:
    """Draw the plot and write the table of a trial's ``result`` into ``folder``; returns
    (path, mimetype) of each file."""
    sizes = result["sizes"]
    fit = result.get("fit") or {}
    png = folder / f"trial_{number}_{name}_scaling.png"
    series = ScalingSeries(name, [r["train_tokens"] for r in sizes], [r["val_ppl"] for r in sizes],
                           fit.get("alpha"), fit.get("A"), fit.get("alpha_low"), fit.get("alpha_high"),
                           fit.get("loo_alphas") or (), fit.get("loo_intercepts") or ())  # fmt: skip
    plot_scaling([series], png, title=f"trial {number}: {name}")
    table = folder / f"trial_{number}_{name}_sizes.csv"
    rows = size_rows(sizes)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return [(png, "image/png"), (table, "text/csv")]


class TrialArtifacts:
    """The artifacts callback of a run: uploads a trial's files to the artifact store in
    ``artifact_dir`` (the folder optuna-dashboard serves them from)."""

    def __init__(self, artifact_dir: Path):
        self.artifact_dir = Path(artifact_dir)

    def __call__(self, trial, name: str, result: dict[str, Any]) -> None:
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        if not result.get("sizes"):
            return
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        store = FileSystemArtifactStore(str(self.artifact_dir))
        with tempfile.TemporaryDirectory(dir=self.artifact_dir) as tmp:  # under the home, like every other write
            for path, mimetype in write_trial_files(Path(tmp), trial.number, name, result):
                upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype=mimetype)
