"""A finished trial's views for optuna-dashboard: its log-log plot (PNG) and per-size table
(CSV, PPL first: :func:`archsearch.search.notes.size_rows`).

``archsearch run`` hands :class:`TrialArtifacts` to the study bridge as its artifacts callback;
the bridge calls it once per finished trial that has sizes (COMPLETE, PRUNED, or FAIL after
some sizes) with a temporary folder for the files, links the plot from the trial's dashboard
note and hands the files to the experiment trackers. A failure is recorded as the trial's
``artifact_error``, never as a failed trial (the views are of numbers the study keeps).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from archsearch.paths import file_part
from archsearch.report.plots import ScalingSeries, plot_scaling
from archsearch.search.notes import size_rows

if TYPE_CHECKING:
    from archsearch.result import SizeRecord


class TrialFile(NamedTuple):
    """A file the artifacts callback wrote for a finished trial."""

    path: Path
    mimetype: str
    url: str | None = None
    """Where optuna-dashboard serves it (None: not stored for the dashboard)."""


def write_trial_files(folder: Path, number: int, name: str, records: Sequence[SizeRecord], fit: dict[str, Any] | None) -> list[TrialFile]:
    """Draw the plot and write the table of a trial's per-size ``records`` (smallest first)
    and ``fit`` (``ScalingFit.to_dict()`` form, or None) into ``folder``."""
    fit = fit or {}
    part = file_part(name)  # a long search label or a "/" in it: still one file in the folder
    png = folder / f"trial_{number}_{part}_scaling.png"
    series = ScalingSeries(name, [r.train_tokens for r in records], [r.val_ppl for r in records],
                           fit.get("alpha"), fit.get("A"), fit.get("alpha_low"), fit.get("alpha_high"),
                           fit.get("loo_alphas") or (), fit.get("loo_intercepts") or ())  # fmt: skip
    plot_scaling([series], png, title=f"trial {number}: {name}")
    table = folder / f"trial_{number}_{part}_sizes.csv"
    rows = size_rows(records)
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return [TrialFile(png, "image/png"), TrialFile(table, "text/csv")]


class TrialArtifacts:
    """The artifacts callback of a run: writes a trial's files and uploads them to the artifact
    store in ``artifact_dir`` (the folder optuna-dashboard serves them from)."""

    def __init__(self, artifact_dir: Path):
        self.artifact_dir = Path(artifact_dir)

    def __call__(self, trial, name: str, records: Sequence[SizeRecord], fit: dict[str, Any] | None, folder: Path) -> list[TrialFile]:
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        if not records:
            return []
        files = write_trial_files(Path(folder), trial.number, name, records, fit)
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        store = FileSystemArtifactStore(str(self.artifact_dir))
        out = []
        for f in files:
            aid = upload_artifact(artifact_store=store, file_path=str(f.path), study_or_trial=trial, mimetype=f.mimetype)
            out.append(f._replace(url=f"/artifacts/{trial.study._study_id}/{trial._trial_id}/{aid}"))  # optuna-dashboard's route
        return out
