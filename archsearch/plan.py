"""A trial's plan: where a space file, one of its configs and the prepared data become the
:class:`~archsearch.trial.TrialPlan` a worker runs (no Optuna, no Ray).

``archsearch trial`` builds its one plan here, ``archsearch run`` hands :func:`trial_plan`
(bound to the space and the data) to the study bridge, which builds one per suggested trial:
the same config gives the same plan whichever command runs it. Nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from archsearch import paths
from archsearch.errors import ConfigError
from archsearch.space import Space
from archsearch.trial import TrialPlan


def trial_plan(space: Space, params: dict[str, Any], *, name: str, data_path: str, use_cache: bool = True,
               device: str = "cpu") -> TrialPlan:  # fmt: skip
    """The plan of config ``params`` (searched fields, canonical names) of ``space`` on the
    prepared data at ``data_path``. ``device`` is the one to train on; a Ray worker sets its
    own. Raises ConfigError when ``params`` make an invalid run config."""
    return TrialPlan(
        params=dict(params),
        config=space.run_config(params).to_dict(),
        sizes=list(space.data.sizes),
        size_unit=space.data.size_unit,
        seeds=list(space.seeds),
        objectives=[o.to_dict() for o in space.objectives],
        data_path=str(data_path),
        cache_dir=str(paths.run_cache_dir()) if use_cache else None,
        device=device,
        name=name,
        extra=plan_extra(space),
    )


def plan_extra(space: Space) -> dict[str, Any]:
    """What a worker needs of the space's rules beyond the run config: ``capped_retry`` (the
    raised caps a capped size is trained again with, ``capped: {retry: ...}``) and ``pruner``
    (the study's pruner, where it has one: a trial may be stopped after any size, which
    ``engine.stage_sizes: auto`` takes into account)."""
    extra: dict[str, Any] = {}
    if space.capped_retry:
        extra["capped_retry"] = dict(space.capped_retry)
    pruner = (space.early_stopping or {}).get("pruner", "none")
    if pruner != "none":
        extra["pruner"] = pruner
    return extra


def chosen_config(space: Space, config: str | None = None) -> tuple[str, dict[str, Any]]:
    """``archsearch trial``'s config: the named one (default: the space's first; a config an
    override made the same as another is that other one). Run-field overrides are already in
    the space's configs (archsearch.space.apply_run_overrides). Returns (name, params)."""
    if config in space.merged:
        config = space.merged[config]
    if config is not None and config not in space.configs:
        raise ConfigError(f"--config {config!r}: the space has {', '.join(space.configs) or 'no named configs'}")
    name = config or next(iter(space.configs), "base")
    params = dict(space.configs.get(name, {}))
    space.run_config(params)  # every problem of the result, before anything is prepared
    return name, params


def prepare_space_data(space: Space, progress: Callable[[str], None] | None = None):
    """Prepared data for a space, with its sizes checked against what the data holds;
    ``progress(message)`` hears what the preparation does (console.data_progress prints it)."""
    from archsearch.data import prepare_data

    data = prepare_data(space.data, progress=progress or (lambda _msg: None))
    unit = space.data.size_unit
    available = data.available(unit)
    too_big = [s for s in space.data.sizes if s > available]
    if too_big:
        raise ConfigError(
            f"data.sizes: {', '.join(f'{s:,}' for s in too_big)} {unit} asked, but the prepared "
            f"{space.data.source} data holds {available:,} {unit} for training"
        )
    return data
