"""One trial: one architecture across the data sizes -> a result record (pure: no Optuna/Ray).

Sizes run smallest first (data size is the fidelity); each (size, seed) run is looked up
in the run cache before it is trained. After every size the caller's ``on_size`` gets the
per-size record and the partial fit, and may stop the trial by returning ``False`` (that
is how a search prunes). Replicate seeds of a size are combined before the fit: PPL by
geometric mean (the fit is on ln PPL), every other number by arithmetic mean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from archsearch.config import RunConfig, resolve_precision, run_config_from_dict
from archsearch.runcache import RunCache, run_key
from archsearch.scaling import ScalingFit, fit_power_law
from archsearch.space import OBJECTIVES, Objective

# numbers reported per size (means over seeds)
SIZE_METRICS = (
    "train_tokens", "val_tokens", "val_ppl", "val_loss", "val_acc", "train_er", "val_er",
    "phase1_iterations", "phase1_convergence_rate", "phase2_best_epoch", "phase2_stopped_epoch",
    "phase1_seconds", "phase1_tokens_per_s", "contexts_seconds", "val_step_us", "er_seconds", "phase2_seconds",
    "phase2_tokens_per_s", "seconds",
)  # fmt: skip


@dataclass
class TrialPlan:
    """Everything a worker needs to run a trial, as plain data (it crosses process borders)."""

    params: dict[str, Any]
    config: dict[str, Any]
    sizes: list[int]
    size_unit: str
    seeds: list[int]
    objectives: list[dict[str, Any]]
    data_path: str
    cache_dir: str | None = None
    device: str = "cpu"
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run_config(self) -> RunConfig:
        return run_config_from_dict(self.config)

    @property
    def objective_list(self) -> list[Objective]:
        return [Objective(**o) for o in self.objectives]


def combine_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One per-size record from the runs of its seeds."""
    first = runs[0]
    keep = ("size", "size_unit", "device", "precision", "phase1_params", "phase2_params", "total_params", "embed_dim", "vocab_size")
    rec: dict[str, Any] = {k: first[k] for k in keep if k in first}
    for k in SIZE_METRICS:
        vals = [r[k] for r in runs]
        rec[k] = sum(vals) / len(vals)
    rec["val_ppl"] = math.exp(sum(math.log(r["val_ppl"]) for r in runs) / len(runs))
    rec["train_tokens"] = first["train_tokens"]
    rec["val_tokens"] = first["val_tokens"]
    rec["seeds"] = [r["seed"] for r in runs]
    rec["cached"] = all(r.get("cached", False) for r in runs)
    if len(runs) > 1:
        rec["val_ppl_seeds"] = [r["val_ppl"] for r in runs]
    return rec


def fit_sizes(records: list[dict[str, Any]]) -> ScalingFit | None:
    if len(records) < 2:
        return None
    return fit_power_law([r["train_tokens"] for r in records], [r["val_ppl"] for r in records])


def objective_values(objectives: list[Objective], records: list[dict[str, Any]], fit: ScalingFit | None) -> list[float | None]:
    """The value of every objective from the sizes done so far (None where not computable yet)."""
    if not records:
        return [None for _ in objectives]
    last = records[-1]
    out: list[float | None] = []
    for o in objectives:
        if OBJECTIVES[o.name][1] and fit is None:
            out.append(None)
        elif o.name == "alpha":
            out.append(fit.alpha)
        elif o.name == "ppl_at":
            out.append(fit.extrapolate(o.target_tokens).ppl)
        elif o.name == "final_ppl":
            out.append(last["val_ppl"])
        elif o.name == "final_acc":
            out.append(last["val_acc"])
        elif o.name == "val_er":
            out.append(last["val_er"])
        else:
            out.append(float(last[o.name]))
    return out


def summarize(plan: TrialPlan, records: list[dict[str, Any]], seconds: float, complete: bool) -> dict[str, Any]:
    """The trial's result record: per-size table, fit, objectives, counts."""
    objectives = plan.objective_list
    fit = fit_sizes(records)
    target = next((o.target_tokens for o in objectives if o.name == "ppl_at"), None)
    cfg = plan.run_config
    counts = {k: records[0][k] for k in ("phase1_params", "phase2_params", "total_params")} if records else {}
    result: dict[str, Any] = {
        "name": plan.name,
        "params": plan.params,
        "config": cfg.to_dict(),
        "sizes": records,
        "fit": fit.to_dict(target) if fit is not None else None,
        "objectives": {o.label: v for o, v in zip(objectives, objective_values(objectives, records, fit))},
        "complete": complete,
        "seconds": seconds,
        "device": records[-1]["device"] if records else None,
        **counts,
    }
    return result


def prepare_space_data(space, quiet: bool = False):
    """Prepared data for a space, with its sizes checked against what the data holds."""
    from archsearch.console import err_console
    from archsearch.data import prepare_data
    from archsearch.errors import ConfigError

    def say(msg: str) -> None:
        if not quiet:
            err_console.print(f"[dim]data:[/dim] {msg}")

    data = prepare_data(space.data, progress=say)
    unit = space.data.size_unit
    available = data.available(unit)
    too_big = [s for s in space.data.sizes if s > available]
    if too_big:
        raise ConfigError(
            f"data.sizes: {', '.join(f'{s:,}' for s in too_big)} {unit} asked, but the prepared "
            f"{space.data.source} data holds {available:,} {unit} for training"
        )
    return data


OnSize = Callable[[dict[str, Any], dict[str, Any]], bool | None]
"""on_size(size_record, partial_result) -> False to stop the trial after this size."""


def run_trial(plan: TrialPlan, on_size: OnSize | None = None, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train ``plan``'s architecture at every size (smallest first) and fit the law."""
    import numpy as np
    import torch

    from archsearch.cvfp.engine import train_run
    from archsearch.data import load_prepared

    t0 = time.perf_counter()
    data = load_prepared(plan.data_path)
    cfg = plan.run_config
    # the run-cache key holds the arithmetic actually used on this device
    cfg = cfg.replace(**{"engine.precision": resolve_precision(cfg.engine.precision, torch.device(plan.device).type)})
    cache = RunCache(plan.cache_dir) if plan.cache_dir else None
    embedding = None
    val_ids = torch.from_numpy(np.asarray(data.val_tokens, dtype=np.int64))
    records: list[dict[str, Any]] = []
    complete = True
    for i, size in enumerate(sorted(plan.sizes)):
        runs = []
        for seed in plan.seeds:
            key = run_key(cfg, data.stream_fingerprint(size, plan.size_unit), seed)
            hit = cache.get(key) if cache is not None else None
            if hit is not None:
                runs.append(dict(hit, cached=True))
                if progress:
                    progress("cached", size=size, size_index=i, seed=seed)
                continue
            if embedding is None:
                embedding = torch.from_numpy(np.asarray(data.embedding(), dtype=np.float32))
            train_ids = torch.from_numpy(np.asarray(data.train_stream(size, plan.size_unit), dtype=np.int64))

            def relay(event, _size=size, _i=i, _seed=seed, **info):
                if progress:
                    progress(event, size=_size, size_index=_i, seed=_seed, **info)

            relay("start")
            metrics = train_run(cfg, embedding, train_ids, val_ids, seed, plan.device, relay)
            metrics.update(size=size, size_unit=plan.size_unit, key=key)
            if cache is not None:
                cache.put(key, metrics)
            runs.append(dict(metrics, cached=False))
        records.append(combine_seeds(runs))
        partial = summarize(plan, records, time.perf_counter() - t0, complete=len(records) == len(plan.sizes))
        if on_size is not None and on_size(records[-1], partial) is False and len(records) < len(plan.sizes):
            complete = False
            break
    return summarize(plan, records, time.perf_counter() - t0, complete)
