"""One trial: one architecture across the data sizes -> a result record (pure: no Optuna/Ray).

Sizes run smallest first (data size is the fidelity); each (size, seed) run is looked up
in the run cache before it is trained. After every size the caller's ``on_size`` gets the
per-size :class:`~archsearch.result.SizeRecord` and the partial result, and may stop the
trial by returning ``False`` (that is how a search prunes). Replicate seeds of a size are
combined before the fit (:func:`combine_seeds`). Nothing here prints: progress goes to the
caller's callbacks.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from archsearch.config import RunConfig, resolve_precision, run_config_from_dict
from archsearch.errors import is_out_of_memory
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
    combines the two sources of noise, each of a mean over n seeds:

        val_loss_se = sqrt(mean_i(se_i^2) / n + var_between / n)

    with se_i the run's own standard error (its validation tokens) and var_between the
    sample variance of the runs' losses across seeds (0 with one seed)."""
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
        val_loss_se=math.sqrt(within / n + between / n),
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
    also everything kept for later trials: the calling thread's family state (kept phase-2
    session) and the size threads (:func:`release_size_threads`, with theirs), so the next
    trial starts as in a fresh process. After a completed one the kept sessions stay, for a
    later trial of the same shape."""
    if failed:
        try:
            family = plan.run_config.family_object()
        except Exception:  # a plan that never made a family kept nothing
            family = None
        if family is not None:
            release_family(family)
        release_size_threads()
    free_memory()


def release_size_threads() -> None:
    """End the process's size threads (:func:`_pool`): each one's thread-local state, its
    kept phase-2 session and CUDA stream included, goes with it; the next trial starts new
    ones. Only between trials (it waits for the threads' work)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True)


def train_run_once(family: Any, cfg: RunConfig, data: Any, seed: int, device: str, progress: Callable[..., None]) -> RunResult:
    """``family.train`` with the clean-up of a failure (:func:`free_after_failure`): the failed
    run leaves nothing allocated behind. An out-of-memory failure while the family had a kept
    session is retried once after the clean-up (the kept session may be what filled the
    memory); a second failure is raised. A result that is not a RunResult is a TypeError
    naming the family and the type."""
    retried = False
    while True:
        try:
            run = family.train(cfg.family_config, data, seed, device, progress)
            break
        except Exception as e:
            kept = free_after_failure(family, e)
            if retried or not kept or not is_out_of_memory(e):
                raise
            message = f"{type(e).__name__} with a kept phase-2 session: freed it, training the run again once"
        # the failed attempt's exception (and its frames) are gone here
        free_memory()
        retried = True
        progress("notice", message=message)
    if not isinstance(run, RunResult):
        kind = type(run).__qualname__ if type(run).__module__ == "builtins" else f"{type(run).__module__}.{type(run).__qualname__}"
        raise TypeError(f"family {cfg.family!r}: train returned {kind}, not an archsearch.result.RunResult")
    return run


OnSize = Callable[[SizeRecord, dict[str, Any]], bool | None]
"""on_size(size_record, partial_result) -> False to stop the trial after this size."""


CONCURRENT_SIZES_AUTO = 1
"""``engine.concurrent_sizes: 0`` (auto): one size at a time, on a GPU too. Sizes at once in
threads are opt-in and experimental: on an H200 four at once gave a NaN in phase 1's first
iteration of one run in one of four repeats (numbers unlike the sequential run's), and
``archsearch run`` of the report's grid was no faster with two (benchmarks/NOTES.md, v10)."""


def concurrent_sizes(cfg: RunConfig) -> int:
    """How many sizes of a trial run at once: ``engine.concurrent_sizes``, auto resolved
    (:data:`CONCURRENT_SIZES_AUTO`); always 1 for a family other than CVFP (its runs may draw
    from global random state, which threads would share)."""
    if cfg.family != "cvfp":
        return 1
    n = cfg.engine.concurrent_sizes
    if n == 0:
        return CONCURRENT_SIZES_AUTO
    return n


_POOLS: dict[int, Any] = {}
_POOLS_LOCK = threading.Lock()
_THREAD = threading.local()


def _pool(n: int):
    """The process's pool of ``n`` size threads, kept for the next trial: each thread keeps its
    own CUDA stream and phase-2 session (cvfp/fast/graphs.py), so a worker's later trials reuse
    them as one thread's later sizes do."""
    from concurrent.futures import ThreadPoolExecutor

    with _POOLS_LOCK:
        if n not in _POOLS:
            _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"archsearch-size{n}")
        return _POOLS[n]


def _on_own_stream(device: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the calling thread's own CUDA stream of ``device`` (plain call elsewhere)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return fn()
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    streams = _THREAD.__dict__.setdefault("streams", {})
    if index not in streams:
        streams[index] = torch.cuda.Stream(torch.device("cuda", index))
    with torch.cuda.device(index), torch.cuda.stream(streams[index]):
        out = fn()
        streams[index].synchronize()  # the results are complete before another thread reads them
        return out


def in_order(items: list[Any], work: Callable[[Any], Any], n: int, device: str = "cpu", idle: Callable[[], None] | None = None):
    """Yield ``work(item)`` for every item, in the items' order, running up to ``n`` items at
    once in threads (each on its own CUDA stream of ``device``). With ``n == 1`` everything runs
    in the calling thread, one item after another. At most ``n`` items are started ahead
    of the one the caller is waiting for, so closing the generator early (a pruned trial)
    wastes at most ``n - 1`` runs: items not yet started are cancelled and those running are
    waited for, and so they are when ``work`` raises (the first exception in item order is
    raised, after every earlier item's result was yielded, as one item after another would).
    ``idle()`` is called in the calling thread while it waits (every ~20 ms) and once more
    before each result is yielded."""
    if n <= 1 or len(items) <= 1:
        for item in items:
            yield work(item)
        return
    from collections import deque
    from concurrent.futures import wait

    pool = _pool(n)
    pending = deque()
    nxt = 0
    try:
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < n:
                item = items[nxt]
                pending.append(pool.submit(_on_own_stream, device, lambda item=item: work(item)))
                nxt += 1
            first = pending.popleft()
            while idle is not None and not first.done():
                idle()
                wait([first], timeout=0.02)
            if idle is not None:
                idle()
            yield first.result()
    finally:
        for f in pending:
            f.cancel()
        for f in pending:
            if not f.cancelled():
                try:
                    f.result()
                except BaseException:  # an item after the one that stopped the loop: not asked for
                    pass


def warm_key(cfg: RunConfig, device: str) -> tuple[str, str, str]:
    """What a run's compiled kernels depend on: the model's shape, the engine settings, the device."""
    import json

    return (json.dumps(cfg.to_dict()["model"], sort_keys=True), json.dumps(cfg.to_dict()["engine"], sort_keys=True), device)


_WARM: set[Any] = set()
_WARM_LOCK = threading.Lock()


def first_use_alone(shape: Any, fn: Callable[[], Any]) -> Any:
    """``fn()``; the first call for a ``shape`` in this process runs alone among the callers
    of this function (the others wait for it): a model shape's first run compiles its Triton
    kernels and makes the process's first CUDA, cuBLAS and Triton use, and no other thread
    must capture a CUDA graph meanwhile (benchmarks/NOTES.md, "in-process concurrency")."""
    with _WARM_LOCK:  # held through a first run: a call for any shape waits for it to end
        if shape not in _WARM:
            out = fn()
            _WARM.add(shape)
            return out
    return fn()


def run_trial(plan: TrialPlan, on_size: OnSize | None = None, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train ``plan``'s architecture at every size (smallest first) and fit the law.

    Up to ``engine.concurrent_sizes`` sizes train at once (:func:`in_order`); the records, the
    ``on_size`` calls and a failure come in size order, as with one size after another, and
    every callback (``on_size``, ``progress``) is called in the calling thread (a Ray Tune
    session, a live view): the sizes' threads queue their progress events for it."""
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
    embedding_lock = threading.Lock()
    val_ids = torch.from_numpy(data.val_ids())
    records: list[SizeRecord] = []
    complete = True
    retry = plan.extra.get("capped_retry") or {}
    sizes = sorted(plan.sizes)
    threads = concurrent_sizes(cfg)

    caller = threading.get_ident()
    events: queue.SimpleQueue = queue.SimpleQueue()

    def report(event, **info):
        if progress:
            if threading.get_ident() == caller:
                progress(event, **info)
            else:  # a size in a thread: the event reaches the caller from the caller's thread
                events.put((event, info))

    def relay_events():
        while True:
            try:
                event, info = events.get_nowait()
            except queue.Empty:
                return
            progress(event, **info)

    def run_size(cfg_used: RunConfig, size: int, i: int) -> tuple[list[RunResult], list[bool]]:
        runs: list[RunResult] = []
        cached: list[bool] = []
        for seed in plan.seeds:
            key = run_key(cfg_used, data.stream_fingerprint(size, plan.size_unit), seed)
            hit = cache.get(key) if cache is not None else None
            if hit is not None:
                runs.append(hit)
                cached.append(True)
                report("cached", size=size, size_index=i, seed=seed)
                continue
            with embedding_lock:
                if not embedding:
                    embedding.append(torch.from_numpy(np.asarray(data.embedding(), dtype=np.float32)))
            train_ids = torch.from_numpy(data.train_ids(size, plan.size_unit))

            def relay(event, _seed=seed, **info):
                report(event, size=size, size_index=i, seed=_seed, **info)

            relay("start")
            train = lambda: train_run_once(family, cfg_used, RunData(embedding[0], train_ids, val_ids), seed, plan.device, relay)  # noqa: E731
            run = first_use_alone(warm_key(cfg_used, plan.device), train) if threads > 1 else train()
            if cache is not None:
                cache.put(key, run)
            runs.append(run)
            cached.append(False)
        return runs, cached

    def train_size(item: tuple[int, int]) -> SizeRecord:
        i, size = item
        runs, cached = run_size(cfg, size, i)
        raised = retry_settings(retry, {f for r in runs for f in r.capped})
        if raised:  # the space raises the caps a run hit: the size is trained again with them
            runs, cached = run_size(cfg.replace(**raised), size, i)
        record = combine_seeds(runs, size, plan.size_unit, cached)
        record.retried = raised
        return record

    sized = in_order(list(enumerate(sizes)), train_size, threads, plan.device, idle=relay_events if progress else None)
    try:
        for record in sized:
            records.append(record)
            partial = summarize(plan, records, time.perf_counter() - t0, complete=len(records) == len(plan.sizes))
            if on_size is not None and on_size(records[-1], partial) is False and len(records) < len(plan.sizes):
                complete = False
                break
    finally:
        sized.close()  # a pruned or failed trial: sizes not started are cancelled, running ones finish
    return summarize(plan, records, time.perf_counter() - t0, complete)
