"""The Python API: what the ``run``, ``fit`` commands and a study's results are in a notebook.

    import archsearch
    summary = archsearch.run("spaces/quickstart.yaml", overrides=["phase2.max_epochs=2"])
    df = archsearch.results("quickstart")            # one row per trial x size
    fit = archsearch.fit([1000, 2000, 4000], [900.0, 700.0, 560.0])

Nothing here prints unless asked (``quiet=False``); bad input raises
:class:`archsearch.errors.ConfigError` (the CLI's exit 2) naming every problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from archsearch.errors import ConfigError
from archsearch.result import SizeRecord

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
FIT_COLUMNS = ("alpha", "alpha_low", "alpha_high", "alpha_se", "A", "r2", "target_tokens", "ppl_at_target", "ppl_at_target_low", "ppl_at_target_high")


def load(space_or_path: Any, overrides: Iterable[str] = ()):
    """A validated :class:`~archsearch.space.Space` from a path, a mapping (the YAML as a dict)
    or a Space; ``overrides`` are the CLI's dotted ``key=value`` strings (or a mapping)."""
    from archsearch.space import Space, load_space, override_space

    import copy

    items = [f"{k}={_yaml(v)}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else list(overrides or ())
    # a mapping or a Space gets the overrides as a file does (a run field's to every config)
    if isinstance(space_or_path, Space):
        if items:
            return override_space(copy.deepcopy(space_or_path.raw), items, space_or_path.path)
        return space_or_path
    if isinstance(space_or_path, Mapping):
        return override_space(copy.deepcopy(dict(space_or_path)), items, "<space>")
    if isinstance(space_or_path, (str, Path)):
        return load_space(space_or_path, items)
    raise ConfigError(f"space: expected a path, a mapping or a Space, got {type(space_or_path).__name__}")


def _yaml(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def run(space_or_path: Any, overrides: Iterable[str] | Mapping[str, Any] = (), *, storage: str | None = None,
        study: str | None = None, n_trials: int | None = None, address: str | None = None, quiet: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run a study (``archsearch run``) and return its summary: the dict ``run --json`` writes
    (study, storage, seconds, interrupted, counts, queued, failed_stale, timings, trials).

    Ray is started in this process (embedded, local) unless it already runs or ``address``
    names a cluster; it stays up for the next call. ``quiet=False`` shows the live view."""
    from archsearch.search.runner import run_search

    sp = load(space_or_path, overrides)
    summary = run_search(sp, storage=storage, study_name=study, n_trials=n_trials, address=address,
                         view_mode="quiet" if quiet else "auto")  # fmt: skip
    return summary.to_dict()


def fit(tokens: Sequence[float], ppl: Sequence[float], level: float = 0.95):
    """Fit ``PPL = A * tokens^alpha``: a :class:`~archsearch.scaling.ScalingFit` (alpha, A,
    r2, the jackknife interval; ``.extrapolate(T)``, ``.predict(T)``, ``.to_dict()``)."""
    from archsearch.scaling import fit_power_law

    return fit_power_law(tokens, ppl, level=level)


def results(study: Any, storage: str | None = None):
    """A pandas DataFrame with one row per trial x size (a trial with no finished size: one
    row with the size columns empty). Columns, typed: ``trial``, ``config``, ``family`` (the
    model family: cvfp, gpt, ...), the searched params, ``state``, ``size``, ``size_unit``, ``tokens`` (training tokens), ``val_tokens``,
    ``ppl`` (+ ``ppl_low``/``ppl_high``), ``acc``, ``er``, ``train_er``, ``loss``, ``loss_se``,
    ``phase1_iterations``, ``seconds``, ``cached``, ``capped`` (the size hit a training cap)
    and ``capped_by`` (which: ``max_epochs``, ``phase1_max_iterations``), the trial's fit (``alpha``, ``alpha_low``,
    ``alpha_high``, ``alpha_se``, ``A``, ``r2``, ``ppl_at_target`` ...), ``value_<objective>``
    per objective, ``phase1_params``/``phase2_params``/``total_params``, ``device``,
    ``wall_seconds``, ``reason`` (why pruned or failed), ``repeat_of`` (a search's proposal of a
    config the study already held: the original trial's number; such a trial has no size rows
    of its own), ``datetime_start``/``_complete``. A config can have several trials (a failed
    or interrupted attempt with the sizes it finished, then the one that completed; repeats):
    filter ``state == "COMPLETE"`` and ``repeat_of`` empty for one set of sizes per config.

    ``study`` is a study name (in ``storage``, default the home's SQLite) or an optuna.Study."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("archsearch.results needs pandas (pip install pandas)") from None

    st = _study(study, storage)
    labels = list(st.user_attrs.get("objectives") or st.metric_names or [f"{i}" for i in range(len(st.directions))])
    trials = st.get_trials(deepcopy=False)
    # a searched or fixed ``family`` is the family column, not a param column
    param_names: list[str] = list(dict.fromkeys(k for t in trials for k in t.distributions if k != "family"))
    rows = []
    for t in trials:
        base = _trial_columns(t, labels, param_names)
        sizes = t.user_attrs.get("sizes") or []
        if not sizes:
            rows.append(base)
        for rec in map(SizeRecord.from_dict, sizes):
            low, high = rec.ppl_interval()
            m = rec.metrics
            rows.append(base | {
                "size": rec.size, "size_unit": rec.size_unit, "tokens": rec.train_tokens, "val_tokens": rec.val_tokens,
                "ppl": rec.val_ppl, "ppl_low": low, "ppl_high": high, "acc": rec.val_acc, "er": m.get("val_er"),
                "train_er": m.get("train_er"), "loss": rec.val_loss, "loss_se": rec.val_loss_se,
                "phase1_iterations": m.get("phase1_iterations"), "seconds": rec.seconds, "cached": rec.cached,
                "capped": bool(rec.capped), "capped_by": ",".join(rec.capped), "family": base["family"] or rec.family,
                "phase1_params": rec.params.get("phase1", base["phase1_params"]),
                "phase2_params": rec.params.get("phase2", base["phase2_params"]),
                "total_params": rec.params.get("total", base["total_params"]),
            })  # fmt: skip
    columns = ["trial", "config", "family", *param_names, "state", "size", "size_unit", "tokens", "val_tokens", "ppl", "ppl_low", "ppl_high",
               "acc", "er", "train_er", "loss", "loss_se", "phase1_iterations", "seconds", "cached", "capped", "capped_by", *FIT_COLUMNS,
               *(f"value_{label}" for label in labels), "phase1_params", "phase2_params", "total_params", "device",
               "wall_seconds", "reason", "repeat_of", "datetime_start", "datetime_complete"]  # fmt: skip
    df = pd.DataFrame(rows, columns=columns)
    types = _param_dtypes(trials, param_names) | {
        "trial": "int64", "config": "string", "family": "string", "state": pd.CategoricalDtype(STATES), "size": "Int64", "size_unit": "string",
        "tokens": "Int64", "val_tokens": "Int64", "cached": "boolean", "capped": "boolean", "capped_by": "string", "phase1_params": "Int64", "phase2_params": "Int64",
        "total_params": "Int64", "device": "string", "reason": "string", "repeat_of": "Int64",
        "datetime_start": "datetime64[ns]", "datetime_complete": "datetime64[ns]",
    }  # fmt: skip
    for col in ("ppl", "ppl_low", "ppl_high", "acc", "er", "train_er", "loss", "loss_se", "phase1_iterations", "seconds",
                *FIT_COLUMNS, *(f"value_{label}" for label in labels), "wall_seconds"):  # fmt: skip
        types[col] = "float64"
    return df.astype(types)


def _study(study: Any, storage: str | None):
    import optuna

    if isinstance(study, optuna.Study):
        return study
    from archsearch.search import storage as stg

    url, opt_storage = stg.existing_storage(storage, "storage")
    names = [s.study_name for s in optuna.get_all_study_summaries(opt_storage, include_best_trial=False)]
    if study not in names:
        raise ConfigError(f"study {study!r}: not in {stg.mask_url(url)} (studies: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study, storage=opt_storage)


def _trial_columns(t, labels: list[str], param_names: list[str]) -> dict[str, Any]:
    ua = t.user_attrs
    values = list(t.values) if t.values is not None else []
    out: dict[str, Any] = {"trial": t.number, "config": ua.get("config_name") or f"trial_{t.number}", "state": t.state.name,
                           "family": ua.get("family") or t.params.get("family")}  # None: read from its sizes (cvfp before families)
    out.update({k: t.params.get(k) for k in param_names})
    fit = ua.get("fit") or {}
    out.update({k: ua.get(k, fit.get(k)) for k in FIT_COLUMNS})
    out.update({f"value_{label}": (values[i] if i < len(values) else None) for i, label in enumerate(labels)})
    out.update({k: ua.get(k) for k in ("phase1_params", "phase2_params", "total_params", "device", "wall_seconds")})
    out["reason"] = ua.get("pruned_reason") or ua.get("error") or ua.get("fail_reason")
    out["repeat_of"] = ua.get("repeat_of")
    out["datetime_start"], out["datetime_complete"] = t.datetime_start, t.datetime_complete
    return out


def _param_dtypes(trials, names: list[str]) -> dict[str, Any]:
    """Searched params typed by their distributions: int -> Int64, float -> float64, a
    categorical of numbers -> those, of anything else -> string."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name in names:
        d = next(t.distributions[name] for t in trials if name in t.distributions)
        if isinstance(d, IntDistribution):
            out[name] = "Int64"
        elif isinstance(d, FloatDistribution):
            out[name] = "float64"
        elif isinstance(d, CategoricalDistribution):
            kinds = {type(c) for c in d.choices}
            out[name] = "Int64" if kinds == {int} else "float64" if kinds <= {int, float} else "boolean" if kinds == {bool} else "string"
    return out
