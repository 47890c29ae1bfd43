"""Space specs -> Optuna objects: distributions, the sampler, the pruner."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from archsearch.space import Distribution, Space


def to_optuna(d: Distribution) -> BaseDistribution:
    if d.type == "categorical":
        return CategoricalDistribution(list(d.choices))
    if d.type == "int":
        return IntDistribution(int(d.low), int(d.high), log=d.log, step=int(d.step or 1))
    return FloatDistribution(float(d.low), float(d.high), log=d.log, step=d.step)


def search_distributions(space: Space) -> dict[str, BaseDistribution]:
    """Distribution of every searched field; a field set by named configs gets one spanning
    the values its configs take, so the dashboard shows it as a param."""
    dists = {name: to_optuna(d) for name, d in space.parameters.items()}
    for name in space.searched_fields:
        if name in dists:
            continue
        values = [cfg.get(name, _base_value(space, name)) for cfg in space.configs.values()]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            # a range, not a categorical: Optuna accepts any int range for one param name
            # across trials, so a grid can later gain configs without breaking the study
            dists[name] = IntDistribution(min(values), max(values))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            dists[name] = FloatDistribution(float(min(values)), float(max(values)))
        else:
            dists[name] = CategoricalDistribution(list(dict.fromkeys(values)))
    return dists


def suggest_all(trial: optuna.Trial, dists: dict[str, BaseDistribution]) -> dict[str, Any]:
    """Record every param on ``trial`` (queued trials keep their fixed values)."""
    for name, d in dists.items():
        if isinstance(d, CategoricalDistribution):
            trial.suggest_categorical(name, d.choices)
        elif isinstance(d, IntDistribution):
            trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        else:
            trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    return dict(trial.params)


def _base_value(space: Space, name: str) -> Any:
    return space.base.value_of(name, space.families)


def full_params(space: Space, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` completed with the base value of every searched field it leaves out (of the
    fields of its family: a gpt config does not get CVFP's context_dim, nor the reverse)."""
    from archsearch.config import resolve_field

    family = params.get("family", space.base.family)

    def applies(name: str) -> bool:
        try:
            resolve_field(name, family)
            return True
        except KeyError:
            return False

    return {name: params.get(name, _base_value(space, name)) for name in space.searched_fields if name in params or applies(name)}


def family_params(space: Space, params: dict[str, Any]) -> dict[str, Any]:
    """The params a trial's run uses: in a search over ``family``, a trial records every
    searched field (Optuna's distributions are fixed), but its run takes only its family's
    (another family's model fields do not apply, and phase1/phase2/engine are CVFP's). Two
    proposals that differ only in fields their family does not use are one config: the
    identity of repeats and the name a proposal gets. A space without a searched ``family``
    keeps every param."""
    from archsearch.config import DEFAULT_FAMILY, resolve_field

    family = params.get("family", space.base.family)

    def used(name: str) -> bool:
        try:
            section, _ = resolve_field(name, family)
        except KeyError:
            return False
        return family == DEFAULT_FAMILY or section == "model"

    return {k: v for k, v in params.items() if used(k)}


class TrialConstraints:
    """Optuna 4's constraints_func for the space's rules on finished trials (``admissible``,
    ``capped: infeasible``): the values the bridge recorded (<= 0 feasible); trials without
    them (pruned, failed) count as feasible. Optuna 5 reads the constraints the bridge sets
    on the trial itself (``Trial.set_constraint``) and needs no function."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, trial) -> list[float]:
        values = trial.user_attrs.get("constraint_values")
        return [float(v) for v in values.values()] if values and len(values) == self.n else [0.0] * self.n


def make_sampler(space: Space) -> optuna.samplers.BaseSampler:
    opts = dict(space.sampler_options)
    s = space.sampler
    if space.has_trial_constraints and s in ("tpe", "nsga2") and not hasattr(optuna.Trial, "set_constraint"):
        opts["constraints_func"] = TrialConstraints(space.n_trial_constraints)
    if s == "grid":
        # every grid point is queued explicitly; the sampler only has to exist
        return optuna.samplers.RandomSampler(seed=0)
    if s == "tpe":
        opts.setdefault("constant_liar", True)  # concurrent trials should not all propose one point
        if opts.get("group") and not opts.get("multivariate"):
            opts["multivariate"] = True
        return optuna.samplers.TPESampler(**opts)
    if s == "random":
        return optuna.samplers.RandomSampler(**opts)
    if s == "cmaes":
        return optuna.samplers.CmaEsSampler(**opts)
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(**opts)
    raise ValueError(s)


def make_pruner(space: Space) -> optuna.pruners.BasePruner:
    """The one component that may stop a trial between sizes (data size is the fidelity)."""
    opts = {k: v for k, v in space.early_stopping.items() if k != "pruner"}
    p = space.early_stopping.get("pruner", "none")
    if p == "none":
        return optuna.pruners.NopPruner()
    if p == "median":
        return optuna.pruners.MedianPruner(**opts)
    if p == "percentile":
        return optuna.pruners.PercentilePruner(**opts)
    if p == "threshold":
        return optuna.pruners.ThresholdPruner(**opts)
    if p == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**opts)
    if p == "hyperband":
        return optuna.pruners.HyperbandPruner(**opts)
    raise ValueError(p)
