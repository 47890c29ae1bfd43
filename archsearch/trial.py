"""One trial: one architecture across the data sizes -> a result record (pure: no Optuna/Ray).

Sizes run smallest first (data size is the fidelity); each (size, seed) run is looked up
in the run cache before it is trained. After every size the caller's ``on_size`` gets the
per-size :class:`~archsearch.result.SizeRecord` and the partial result, and may stop the
trial by returning ``False`` (that is how a search prunes). Replicate seeds of a size are
combined before the fit (:func:`combine_seeds`). The runs to train may go to the family's
``train_many`` (CVFP: ``engine.stage_sizes``, every phase 1 first and the validation passes
batched) with the same records, order and numbers. Nothing here prints: progress goes to the
caller's callbacks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from archsearch.config import RunConfig, resolve_precision, run_config_from_dict
from archsearch.errors import is_cuda_failure, is_out_of_memory
from archsearch.result import RunResult, SizeRecord
from archsearch.runcache import RunCache, run_key
from archsearch.scaling import ScalingFit, fit_power_law
from archsearch.objectives import Objective, objective_values

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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def combine_seeds(runs: list[RunResult], size: int, size_unit: str, cached: list[bool]) -> SizeRecord:
    """One per-size record from the runs of its seeds (``cached[i]``: run i came from the cache).

    PPL is the geometric mean over seeds (the fit is on ln PPL), so ``val_ppl`` = exp(mean
    val_loss); every other number, the metrics and the phase seconds are arithmetic means;
    ``capped`` is the union of the runs' caps. The standard error of the size's mean loss
    combines the two sources of noise:

        val_loss_se = sqrt(mean_i(se_i^2) + var_between / n)

    with se_i the run's own standard error (its validation tokens) and var_between the
    sample variance of the runs' losses across seeds (0 with one seed). Every seed is scored
    on the same validation tokens, so their sampling noise is shared, not averaged away: more
    seeds shrink only the seed-to-seed part (counting the shared part whole errs on the wide
    side where the seeds' per-token errors are not fully correlated)."""
    n = len(runs)
    first = runs[0]
    losses = [r.val_loss for r in runs]
    between = sum((x - _mean(losses)) ** 2 for x in losses) / (n - 1) if n > 1 else 0.0
    within = _mean([r.val_loss_se**2 for r in runs])
    return SizeRecord(
        size=size,
        size_unit=size_unit,
        train_tokens=first.train_tokens,
        val_tokens=first.val_tokens,
        val_loss=_mean(losses),
        val_loss_se=math.sqrt(within + between / n),
        val_ppl=math.exp(_mean([math.log(r.val_ppl) for r in runs])),
        val_acc=_mean([r.val_acc for r in runs]),
        params=dict(first.params),
        seconds=_mean([r.seconds for r in runs]),
        device=first.device,
        precision=first.precision,
        seeds=[r.seed for r in runs],
        phase_seconds={k: _mean([r.phase_seconds.get(k, 0.0) for r in runs]) for k in first.phase_seconds},
        capped=sorted({c for r in runs for c in r.capped}),
        metrics={k: _mean([r.metrics[k] for r in runs]) for k in first.metrics},
        cached=all(cached),
        val_ppl_seeds=[r.val_ppl for r in runs] if n > 1 else [],
        family=first.family,
    )


def fit_sizes(records: list[SizeRecord]) -> ScalingFit | None:
    if len(records) < 2:
        return None
    return fit_power_law([r.train_tokens for r in records], [r.val_ppl for r in records], ln_se=[r.val_loss_se for r in records])


def summarize(plan: TrialPlan, records: list[SizeRecord], seconds: float, complete: bool) -> dict[str, Any]:
    """The trial's result record (plain JSON data: it crosses process borders): the per-size
    records as ``SizeRecord.to_dict()``, fit, objectives, parameter counts."""
    objectives = plan.objective_list
    fit = fit_sizes(records)
    target = next((o.target_tokens for o in objectives if o.name == "ppl_at"), None)
    cfg = plan.run_config
    counts = {f"{k}_params": v for k, v in records[0].params.items()} if records else {}
    result: dict[str, Any] = {
        "name": plan.name,
        "params": plan.params,
        "config": cfg.to_dict(),
        "family": records[0].family if records else cfg.family,
        "sizes": [r.to_dict() for r in records],
        "fit": fit.to_dict(target) if fit is not None else None,
        "objectives": {o.label: v for o, v in zip(objectives, objective_values(objectives, records, fit))},
        "complete": complete,
        "seconds": seconds,
        "device": records[-1].device if records else None,
        **counts,
    }
    return result


def resolved_precision(cfg: RunConfig, device_type: str) -> RunConfig:
    """``cfg`` with ``auto`` precision resolved for the device: the run-cache key holds the
    arithmetic actually used (CVFP: engine.precision; another family: its ``precision``
    field, where it has one)."""
    if cfg.family == "cvfp":
        return cfg.replace(**{"engine.precision": resolve_precision(cfg.engine.precision, device_type)})
    if getattr(cfg.custom, "precision", None) == "auto":
        return cfg.replace(precision=resolve_precision("auto", device_type))
    return cfg


CAP_SETTINGS = {"phase1_max_iterations": "phase1.max_iterations", "max_epochs": "phase2.max_epochs"}
"""The run setting behind each cap flag (archsearch.result.CAP_FLAGS; CVFP's)."""


def retry_settings(retry: dict[str, int], capped: set[str]) -> dict[str, int]:
    """The raised settings a space's ``capped: {retry: ...}`` gives for the caps hit."""
    return {CAP_SETTINGS[f]: retry[CAP_SETTINGS[f]] for f in sorted(capped) if CAP_SETTINGS.get(f) in retry}


def free_memory() -> None:
    """Collect unreachable objects (tensors in reference cycles) and hand PyTorch's cached
    CUDA blocks back to the driver, so that this process's next run, or another process on
    the same GPU (``resources.gpus`` < 1), can allocate them."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def release_family(family: Any) -> bool:
    """The family's own clean-up (its optional ``release``): whether it kept anything."""
    release = getattr(family, "release", None)
    return bool(release()) if release is not None else False


def free_after_failure(family: Any, error: BaseException) -> bool:
    """After a failed run: the locals of the finished frames of ``error``'s traceback (the
    run's tensors) are cleared, the family drops what it keeps (kept sessions, graphs), the
    allocator's cache is emptied. Returns whether the family had kept something."""
    import traceback

    traceback.clear_frames(error.__traceback__)
    kept = release_family(family)
    free_memory()
    return kept


def free_worker(plan: TrialPlan, failed: bool) -> None:
    """After a trial, in a worker that runs others. Always: the allocator's cached blocks go
    back to the driver (a worker sharing the GPU can allocate them). After a failed trial
    also the family's state kept for later trials (its kept phase-2 session), so the next
    trial starts as in a fresh process. After a completed one the kept session stays, for a
    later trial of the same shape."""
    if failed:
        try:
            family = plan.run_config.family_object()
        except Exception:  # a plan that never made a family kept nothing
            family = None
        if family is not None:
            release_family(family)
    free_memory()


def train_run_once(family: Any, cfg: RunConfig, data: Any, seed: int, device: str, progress: Callable[..., None]) -> RunResult:
    """``family.train`` with the clean-up of a failure (:func:`free_after_failure`): the failed
    run leaves nothing allocated behind. An out-of-memory failure while the family had a kept
    session is retried once after the clean-up (the kept session may be what filled the
    memory); a second failure is raised. A result that is not a RunResult is a TypeError
    naming the family and the type. A CUDA failure (:func:`~archsearch.errors.is_cuda_failure`)
    is raised as it is, with no clean-up: the CUDA context may be unusable (every CUDA call would
    fail again), and the worker process is not used again (search/trainable.py)."""
    retried = False
    while True:
        try:
            run = family.train(cfg.family_config, data, seed, device, progress)
            break
        except Exception as e:
            if is_cuda_failure(e):
                raise
            kept = free_after_failure(family, e)
            if retried or not kept or not is_out_of_memory(e):
                raise
            message = f"{type(e).__name__} with a kept phase-2 session: freed it, training the run again once"
        # the failed attempt's exception (and its frames) are gone here
        free_memory()
        retried = True
        progress("notice", message=message)
    return checked_result(cfg, run)


def checked_result(cfg: RunConfig, run: Any, what: str = "train") -> RunResult:
    """``run`` if it is a RunResult, else a TypeError naming the family and the type."""
    if not isinstance(run, RunResult):
        kind = type(run).__qualname__ if type(run).__module__ == "builtins" else f"{type(run).__module__}.{type(run).__qualname__}"
        raise TypeError(f"family {cfg.family!r}: {what} returned {kind}, not an archsearch.result.RunResult")
    return run


OnSize = Callable[[SizeRecord, dict[str, Any]], bool | None]
"""on_size(size_record, partial_result) -> False to stop the trial after this size."""


STAGED_OOM_NOTICE = "{error} while the trial's runs were staged: dropped them, training this run and the rest one after another"


def run_trial(plan: TrialPlan, on_size: OnSize | None = None, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train ``plan``'s architecture at every size (smallest first) and fit the law.

    The runs not in the run cache go through the family's ``train_many`` where it takes them
    (CVFP: ``engine.stage_sizes``: phase 1 of every run first, their validation passes batched,
    then each run's phase 2 in size order), else through ``train`` one after another. Either
    way the records, the ``on_size`` calls (pruning), the run cache and a failure come in
    size order with the same numbers; a stopped trial drops the runs started and not
    finished. A failure while staged that is out of memory drops the staged runs and trains
    that run and the rest one after another (as without staging, a notice says so); any other
    is raised at its run's turn, as one run after another would (a CUDA failure with no
    clean-up, as in train_run_once)."""
    import numpy as np
    import torch

    from archsearch.data import load_prepared
    from archsearch.families import RunData

    t0 = time.perf_counter()
    data = load_prepared(plan.data_path)
    device_type = torch.device(plan.device).type
    cfg = resolved_precision(plan.run_config, device_type)
    family = cfg.family_object()
    cache = RunCache(plan.cache_dir) if plan.cache_dir else None
    embedding: list[Any] = []
    val_ids = torch.from_numpy(data.val_ids())
    records: list[SizeRecord] = []
    complete = True
    retry = plan.extra.get("capped_retry") or {}
    sizes = sorted(plan.sizes)

    def reporter(size: int, i: int, seed: int) -> Callable[..., None]:
        def relay(event, **info):
            if progress:
                progress(event, size=size, size_index=i, seed=seed, **info)

        return relay

    def run_data(size: int) -> RunData:
        if not embedding:
            embedding.append(torch.from_numpy(np.asarray(data.embedding(), dtype=np.float32)))
        return RunData(embedding[0], torch.from_numpy(data.train_ids(size, plan.size_unit)), val_ids)

    def lookup(cfg_used: RunConfig, size: int, seed: int) -> tuple[str, RunResult | None]:
        key = run_key(cfg_used, data.stream_fingerprint(size, plan.size_unit), seed, plan.device)
        return key, cache.get(key) if cache is not None else None

    def alone(cfg_used: RunConfig, size: int, i: int, seed: int) -> RunResult:
        relay = reporter(size, i, seed)
        relay("start")
        return train_run_once(family, cfg_used, run_data(size), seed, plan.device, relay)

    looked_up = {(size, seed): lookup(cfg, size, seed) for size in sizes for seed in plan.seeds}
    todo = [(i, size, seed) for i, size in enumerate(sizes) for seed in plan.seeds if looked_up[size, seed][1] is None]
    staged = None  # the family's iterator over the runs in todo, in order
    train_many = getattr(family, "train_many", None)
    if train_many is not None and len(todo) > 1:
        # each run's data loaded only where the family stages them (else at the run's turn, as ever)
        runs = [(lambda size=size: run_data(size), seed, reporter(size, i, seed)) for i, size, seed in todo]
        staged = train_many(cfg.family_config, runs, plan.device, bool(plan.extra.get("pruner")))
        del runs

    def trained(size: int, i: int, seed: int) -> RunResult:
        """The next run of ``todo``: from the staged iterator while there is one."""
        nonlocal staged
        if staged is not None:
            out = next(staged)
            if not isinstance(out, BaseException):
                return checked_result(cfg, out, "train_many")
            if is_cuda_failure(out):  # no clean-up (train_run_once); the iterator's own may fail on CUDA again
                try:
                    staged.close()
                except Exception:
                    pass
                staged = None
                raise out
            staged.close()
            staged = None
            free_after_failure(family, out)
            if not is_out_of_memory(out):
                raise out
            reporter(size, i, seed)("notice", message=STAGED_OOM_NOTICE.format(error=type(out).__name__))
            del out
            free_memory()
        return alone(cfg, size, i, seed)

    def run_size(cfg_used: RunConfig, size: int, i: int) -> tuple[list[RunResult], list[bool]]:
        runs: list[RunResult] = []
        cached: list[bool] = []
        for seed in plan.seeds:
            key, hit = looked_up[size, seed] if cfg_used is cfg else lookup(cfg_used, size, seed)
            if hit is not None:
                runs.append(hit)
                cached.append(True)
                reporter(size, i, seed)("cached")
                continue
            run = trained(size, i, seed) if cfg_used is cfg else alone(cfg_used, size, i, seed)
            if cache is not None:
                cache.put(key, run)
            runs.append(run)
            cached.append(False)
        return runs, cached

    def train_size(i: int, size: int) -> SizeRecord:
        runs, cached = run_size(cfg, size, i)
        raised = retry_settings(retry, {f for r in runs for f in r.capped})
        if raised:  # the space raises the caps a run hit: the size is trained again with them (alone)
            runs, cached = run_size(cfg.replace(**raised), size, i)
        record = combine_seeds(runs, size, plan.size_unit, cached)
        record.retried = raised
        return record

    try:
        for i, size in enumerate(sizes):
            records.append(train_size(i, size))
            partial = summarize(plan, records, time.perf_counter() - t0, complete=len(records) == len(plan.sizes))
            if on_size is not None and on_size(records[-1], partial) is False and len(records) < len(plan.sizes):
                complete = False
                break
    finally:
        if staged is not None:
            staged.close()  # a stopped or failed trial: the started runs are dropped
    return summarize(plan, records, time.perf_counter() - t0, complete)
