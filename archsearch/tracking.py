"""Experiment trackers: opt-in copies of every trial's results in MLflow, TensorBoard or W&B.

The Optuna study stays the record; a tracker gets what the driver records there, from the
driver alone (the bridge sees every trial's results, so nothing races between Ray workers):

- MLflow: one run per trial (experiment = the study name), its searched params, per-size
  metrics as steps (step = training tokens), the fit (alpha, A, R², interval, extrapolated
  PPL) as metrics, the config, the log-log plot and the per-size table as artifacts; the
  run's status says how the trial ended. Default store: SQLite, ``$ARCHSEARCH_HOME/mlflow/mlflow.db``
  (MLflow 3's own default is ``sqlite:///mlflow.db``: it keeps its plain-file store in
  maintenance mode and refuses to open one unless ``MLFLOW_ALLOW_FILE_STORE=true``). A
  ``tracking_uri`` that names a file store (``file:./mlruns`` or a path) is that opt-in: it
  sets the variable for this process (unless it is set) and MLflow writes the file store.
- TensorBoard: one event directory per trial under ``$ARCHSEARCH_HOME/tensorboard/<study>``:
  per-size scalars at step = training tokens, the fit as scalars, the params as hparams.
- W&B: offline runs (``wandb sync`` uploads them later) under ``$ARCHSEARCH_HOME/wandb``.

Space file::

    tracking:
      mlflow: {tracking_uri: "http://mlflow:5000", experiment: my_study}   # or: mlflow: true
      tensorboard: {log_dir: runs/tb}                                       # or: tensorboard: true
      wandb: {project: archsearch}                                          # or: wandb: true

Parsing (:func:`parse_tracking`) is pure and imports no tracker; the trackers are imported
when a run opens them. A tracker that fails while logging is a warning and the trial's
``tracking_error`` attribute, never a failed trial.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archsearch.errors import shown
from archsearch.paths import file_part
from archsearch.result import SizeRecord

log = logging.getLogger(__name__)

KEYS = {
    "mlflow": ("tracking_uri", "experiment"),
    "tensorboard": ("log_dir",),
    "wandb": ("project", "dir"),
}
"""Trackers and the keys each takes."""

PACKAGES = {"mlflow": ("mlflow",), "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
"""Modules that provide each tracker (any one of them)."""

SIZE_METRICS = ("val_ppl", "val_acc", "val_loss", "val_loss_se", "seconds")
"""Per-size fields logged as metrics (with the family's ``metrics``)."""

FIT_METRICS = ("alpha", "A", "r2", "alpha_se", "alpha_low", "alpha_high", "ppl_at_target", "ppl_at_target_low", "ppl_at_target_high")


@dataclass(frozen=True)
class TrackingSpec:
    """The ``tracking`` section: per tracker its settings, None when it is off."""

    mlflow: dict[str, Any] | None = None
    tensorboard: dict[str, Any] | None = None
    wandb: dict[str, Any] | None = None

    @property
    def enabled(self) -> list[str]:
        return [k for k in KEYS if getattr(self, k) is not None]


def parse_tracking(raw: Any, problems: list[str]) -> TrackingSpec:
    """Validate the ``tracking`` section; append every problem (with its key) to ``problems``.
    Bad values are quoted as the space parser quotes them (:func:`~archsearch.errors.shown`:
    cut to a bounded length), with any password masked."""
    if raw is None:
        return TrackingSpec()
    if not isinstance(raw, dict):
        problems.append(f"tracking: expected a mapping like {{mlflow: true}}, got {_shown(raw)}")
        return TrackingSpec()
    out: dict[str, dict[str, Any] | None] = {}
    for name, value in raw.items():
        if name not in KEYS:
            problems.append(f"tracking.{_key(name)}: unknown tracker (known: {', '.join(KEYS)})")
            continue
        if value is None or value is False:
            out[name] = None
            continue
        if value is True:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"tracking.{name}: expected true, false or a mapping of {', '.join(KEYS[name])}, got {_shown(value)}")
            continue
        ok = True
        for k, v in value.items():
            if k not in KEYS[name]:
                problems.append(f"tracking.{name}.{_key(k)}: unknown key (known: {', '.join(KEYS[name])})")
                ok = False
            elif not isinstance(v, str) or not v.strip():
                problems.append(f"tracking.{name}.{k}: expected a non-empty string, got {_shown(v)}")
                ok = False
        if not any(importlib.util.find_spec(m) is not None for m in PACKAGES[name]):
            problems.append(f"tracking.{name}: needs the {PACKAGES[name][0]} package, which is not installed "
                            f"(pip install 'archsearch[tracking]'{' wandb' if name == 'wandb' else ''})")  # fmt: skip
            ok = False
        if ok:
            out[name] = dict(value)
    return TrackingSpec(**out)


def _shown(value: Any) -> str:
    return shown(_mask(value))


def _key(key: Any) -> str:
    """A key of the user's in a message's dotted path (as the space parser writes it)."""
    return shown(str(key), 60).strip("'")


_CREDENTIALS = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^\s/]*)(?P<tail>@)")
"""``scheme://user:password@``, the password up to the last ``@`` before the path (a raw ``@`` in it included)."""
_SECRET_QUERY = re.compile(r"(?i)(?P<head>[?&][^=&\s#]*(?:pass|pwd|secret|token|auth|credential|key)[^=&\s#]*=)(?P<value>[^&\s#]+)")
"""A password-like query parameter (``?token=…``, ``&api_key=…``), as storage URLs' are masked."""


def _mask(value: Any) -> Any:
    """Text with the password of every ``scheme://user:password@`` in it and the value of every
    password-like query parameter hidden (tracking URIs, and the errors that quote them, may
    carry credentials)."""
    if isinstance(value, str):
        value = _CREDENTIALS.sub(lambda m: f"{m['head']}***{m['tail']}", value)
        return _SECRET_QUERY.sub(lambda m: f"{m['head']}***", value)
    return value


# --------------------------------------------------------------------------- what is logged


@dataclass
class TrialLog:
    """One finished trial, as the trackers receive it."""

    study: str
    number: int
    name: str
    params: dict[str, Any]
    state: str
    """COMPLETE, PRUNED or FAIL."""
    sizes: list[SizeRecord]
    fit: dict[str, Any] | None = None
    objectives: dict[str, float | None] = field(default_factory=dict)
    reason: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    """The log-log plot (PNG) and the per-size table (CSV), when they could be drawn."""


def size_metrics(rec: SizeRecord) -> dict[str, float]:
    """The finite numbers of one size, by metric name."""
    out = {k: float(getattr(rec, k)) for k in SIZE_METRICS}
    out.update({k: float(v) for k, v in rec.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def fit_metrics(log_: TrialLog) -> dict[str, float]:
    fit = log_.fit or {}
    out = {k: float(fit[k]) for k in FIT_METRICS if isinstance(fit.get(k), (int, float))}
    out.update({f"objective_{k}": float(v) for k, v in log_.objectives.items() if isinstance(v, (int, float))})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _param_value(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)


# --------------------------------------------------------------------------- trackers


class Trackers:
    """Every tracker a space asks for, behind one interface; a tracker's failure is logged
    and returned, never raised."""

    def __init__(self, backends: list[Any]):
        self.backends = backends

    @classmethod
    def open(cls, spec: TrackingSpec | None, study: str, home: Path) -> Trackers:
        """Open the trackers of ``spec`` (after every check of the run: this writes files)."""
        backends: list[Any] = []
        if spec is None:
            return cls(backends)
        if spec.mlflow is not None:
            backends.append(MlflowTracker(spec.mlflow, study, home))
        if spec.tensorboard is not None:
            backends.append(TensorBoardTracker(spec.tensorboard, study, home))
        if spec.wandb is not None:
            backends.append(WandbTracker(spec.wandb, study, home))
        return cls(backends)

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _each(self, what: str, *args) -> list[str]:
        errors = []
        for b in self.backends:
            try:
                getattr(b, what)(*args)
            except Exception as e:  # a tracker is a copy: it must not fail the trial
                text = f"{b.name}: {type(e).__name__}: {_mask(str(e))}"[:500]
                log.warning("tracking: %s", text)
                errors.append(text)
        return errors

    def size(self, number: int, name: str, params: dict[str, Any], rec: SizeRecord) -> list[str]:
        """One size of a live trial (trackers that log live: MLflow, TensorBoard)."""
        return self._each("size", number, name, params, rec)

    def finish(self, trial: TrialLog) -> list[str]:
        return self._each("finish", trial)

    def close(self) -> None:
        self._each("close")


def is_file_store(uri: str) -> bool:
    """An MLflow tracking URI that names its plain-file store: ``file:`` or a bare path."""
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):", uri)
    return scheme is None or scheme.group(1).lower() == "file" or len(scheme.group(1)) == 1  # C:\... is a path


class MlflowTracker:
    name = "mlflow"

    def __init__(self, spec: dict[str, Any], study: str, home: Path):
        from mlflow.tracking import MlflowClient

        for quiet in ("mlflow", "alembic"):  # their INFO lines about creating tables (mlflow sets its level on import)
            logging.getLogger(quiet).setLevel(logging.WARNING)

        root = home / "mlflow"
        uri = spec.get("tracking_uri")
        if uri is None:
            root.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{root.resolve() / 'mlflow.db'}"
        elif is_file_store(uri):
            # MLflow 3 refuses its file store unless this is set; naming one is that opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(uri)
        name = spec.get("experiment") or study
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = (root.resolve() / "artifacts").as_uri() if spec.get("tracking_uri") is None else None
            self.experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self.study = study
        self.runs: dict[int, str] = {}

    def _run(self, number: int, name: str, params: dict[str, Any]) -> str:
        if number not in self.runs:
            from mlflow.entities import Param

            run = self.client.create_run(self.experiment_id, run_name=f"{number}_{name}", tags={
                "archsearch.study": self.study, "archsearch.trial": str(number), "archsearch.config": name})  # fmt: skip
            self.client.log_batch(run.info.run_id, params=[Param(k, str(_param_value(v))) for k, v in params.items()])
            self.runs[number] = run.info.run_id
        return self.runs[number]

    def size(self, number: int, name: str, params: dict[str, Any], rec: SizeRecord) -> None:
        from mlflow.entities import Metric

        run_id = self._run(number, name, params)
        now = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, rec.train_tokens) for k, v in size_metrics(rec).items()])

    def finish(self, trial: TrialLog) -> None:
        from mlflow.entities import Metric, RunTag

        new = trial.number not in self.runs
        run_id = self._run(trial.number, trial.name, trial.params)
        now = _now_ms()
        metrics = []
        if new:  # sizes it did not see live (a run it joined late)
            for rec in trial.sizes:
                metrics += [Metric(k, v, now, rec.train_tokens) for k, v in size_metrics(rec).items()]
        last = trial.sizes[-1].train_tokens if trial.sizes else 0
        metrics += [Metric(k, v, now, last) for k, v in fit_metrics(trial).items()]
        tags = [RunTag("archsearch.state", trial.state)]
        if trial.reason:
            tags.append(RunTag("archsearch.reason", trial.reason[:4000]))
        if trial.fit and trial.fit.get("ci_method"):
            tags.append(RunTag("archsearch.ci_method", str(trial.fit["ci_method"])))
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        if trial.config:
            self.client.log_dict(run_id, trial.config, "config.json")
        for path in trial.artifacts:
            self.client.log_artifact(run_id, str(path))
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(trial.state, "FAILED")
        self.client.set_terminated(run_id, status=status)
        self.runs.pop(trial.number, None)

    def close(self) -> None:
        for run_id in self.runs.values():  # trials that never finished (an interrupted run)
            self.client.set_terminated(run_id, status="KILLED")
        self.runs.clear()


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, spec: dict[str, Any], study: str, home: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            from tensorboardX import SummaryWriter
        self.Writer = SummaryWriter
        self.root = Path(spec.get("log_dir") or home / "tensorboard") / study
        self.writers: dict[int, Any] = {}

    def _writer(self, number: int, name: str):
        if number not in self.writers:
            self.writers[number] = self.Writer(log_dir=str(self.root / f"trial_{number}_{file_part(name)}"))
        return self.writers[number]

    def size(self, number: int, name: str, params: dict[str, Any], rec: SizeRecord) -> None:
        w = self._writer(number, name)
        for k, v in size_metrics(rec).items():
            w.add_scalar(f"size/{k}", v, global_step=rec.train_tokens)
        w.flush()

    def finish(self, trial: TrialLog) -> None:
        new = trial.number not in self.writers
        w = self._writer(trial.number, trial.name)
        if new:
            for rec in trial.sizes:
                for k, v in size_metrics(rec).items():
                    w.add_scalar(f"size/{k}", v, global_step=rec.train_tokens)
        last = trial.sizes[-1].train_tokens if trial.sizes else 0
        fit = fit_metrics(trial)
        for k, v in fit.items():
            w.add_scalar(f"fit/{k}", v, global_step=last)
        w.add_text("trial", f"{trial.name} (trial {trial.number}): {trial.state}" + (f", {trial.reason}" if trial.reason else ""), global_step=last)
        hparams = {k: _param_value(v) for k, v in trial.params.items()} | {"config": trial.name, "state": trial.state}
        w.add_hparams(hparams, {f"hparam/{k}": v for k, v in fit.items()} or {"hparam/sizes": float(len(trial.sizes))}, run_name=".")
        w.close()
        self.writers.pop(trial.number, None)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


class WandbTracker:
    """Offline W&B runs, one per trial, written when the trial ends (W&B keeps one live run
    per process comfortably; trials overlap). Without W&B's system metadata
    (``x_disable_meta``): it records the driver's command line (``--storage
    postgresql://user:PASSWORD@…``), host and user name, which ``wandb sync`` would upload."""

    name = "wandb"

    def __init__(self, spec: dict[str, Any], study: str, home: Path):
        import wandb

        self.wandb = wandb
        self.project = spec.get("project") or "archsearch"
        self.dir = Path(spec.get("dir") or home / "wandb")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.study = study

    def size(self, number: int, name: str, params: dict[str, Any], rec: SizeRecord) -> None:
        pass  # logged with the rest when the trial ends

    def finish(self, trial: TrialLog) -> None:
        wandb = self.wandb
        run = wandb.init(project=self.project, group=self.study, name=f"{trial.number}_{trial.name}", dir=str(self.dir),
                         mode="offline", config=dict(trial.params, config_name=trial.name), reinit="create_new",
                         settings=wandb.Settings(silent=True, console="off", x_disable_meta=True))  # fmt: skip
        try:
            for rec in trial.sizes:
                run.log(size_metrics(rec) | {"train_tokens": rec.train_tokens}, step=rec.train_tokens)
            run.summary.update(fit_metrics(trial) | {"state": trial.state})
            for path in trial.artifacts:
                if path.suffix == ".png":
                    run.log({"scaling": wandb.Image(str(path))}, step=trial.sizes[-1].train_tokens if trial.sizes else 0)
                else:
                    run.save(str(path), base_path=str(path.parent), policy="now")
        finally:
            run.finish(exit_code=0 if trial.state != "FAIL" else 1)

    def close(self) -> None:
        pass


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
