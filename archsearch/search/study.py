"""Study bookkeeping: create/continue a study, fail stale trials, queue missing configs.

What a re-run of the same command on the same storage does:
- COMPLETE and PRUNED trials are kept and not recomputed;
- RUNNING trials whose driver is gone (same host: the process is dead; other host: no
  heartbeat for ``GRACE_S``) are failed with the reason, and their configs queued again;
- grid configs (and a search's warm-start configs) that have no COMPLETE, PRUNED, WAITING
  or live RUNNING trial are queued, each once;
- a search then adds ``n_trials`` new trials.
All of it happens under :func:`~archsearch.search.storage.study_lock`, so two processes on
one study never queue a config twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from archsearch.errors import ConfigError, shown
from archsearch.search.distributions import full_params, make_pruner, make_sampler
from archsearch.space import Space

MAX_SECONDS_VAR = 86_400.0
"""Largest ``ARCHSEARCH_HEARTBEAT_S`` / ``ARCHSEARCH_GRACE_S`` (a day)."""


def _seconds_var(name: str, default: float) -> tuple[float, str | None]:
    """(seconds, problem) of an environment variable: its value where it is a finite number
    in (0, a day], else the default and why it is not (read at import, never raising there;
    :func:`check_heartbeat_vars` makes the problem a usage error before a run writes anything)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default, None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS_VAR):
        return default, f"{name}={shown(raw)}: expected seconds, a number > 0 and at most {MAX_SECONDS_VAR:,.0f}"
    return value, None


HEARTBEAT_S, _HEARTBEAT_PROBLEM = _seconds_var("ARCHSEARCH_HEARTBEAT_S", 10.0)
GRACE_S, _GRACE_PROBLEM = _seconds_var("ARCHSEARCH_GRACE_S", 60.0)


def check_heartbeat_vars() -> None:
    """ConfigError naming every bad ``ARCHSEARCH_HEARTBEAT_S`` / ``ARCHSEARCH_GRACE_S``: not a
    number (a traceback at import before), 0, negative or NaN (a heartbeat loop without pause,
    writing to the storage as fast as it can; a grace no heartbeat can meet, which fails
    another host's live trials as stale), or a grace not longer than the heartbeat (the same,
    between two heartbeats)."""
    problems = [p for p in (_HEARTBEAT_PROBLEM, _GRACE_PROBLEM) if p]
    if not problems and GRACE_S <= HEARTBEAT_S:
        problems.append(f"ARCHSEARCH_GRACE_S={GRACE_S:g} must be longer than ARCHSEARCH_HEARTBEAT_S={HEARTBEAT_S:g}: "
                        "a live driver's trials would be taken as stale between two of its heartbeats")  # fmt: skip
    if problems:
        raise ConfigError(problems)

A_OWNER = "archsearch:owner"
A_HEARTBEAT = "archsearch:heartbeat"
A_SIGNATURE = "archsearch:signature"
A_RESERVED = "archsearch:reserved"
"""On a WAITING trial: the driver that handed it to Ray, which has not started it yet (a
trial becomes RUNNING only once its worker runs it). Other drivers leave it alone while
that driver lives."""


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def trial_key_params(t: FrozenTrial) -> dict[str, Any]:
    """A trial's config: its queued params, else its sampled params."""
    return dict(t.system_attrs.get("fixed_params") or t.params)


def trial_key(t: FrozenTrial) -> str:
    """Identity of a trial's config: its queued params, else its sampled params."""
    return params_key(trial_key_params(t))


def config_key(params: dict[str, Any]) -> str:
    """Identity of a config for repeats: params with floats rounded to 12 significant digits,
    so that values on a space's step grid that differ only by float arithmetic are one config
    (Optuna's distributions already round proposals to their steps)."""
    return params_key({k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in params.items()})


def ask_new(study: optuna.Study) -> optuna.Trial:
    """``study.ask()`` without taking a WAITING trial: Optuna's ask pops the queue first,
    which here holds grid/warm-start configs (taken by :func:`pop_waiting`, costliest first)
    and trials reserved for a Ray trial that has not started yet."""
    study._thread_local.cached_all_trials = None
    return optuna.Trial(study, study._storage.create_new_trial(study._study_id))


def reserve(study: optuna.Study, trial_id: int) -> None:
    """Put a trial just taken or created (RUNNING) back to WAITING, reserved for this driver."""
    storage = study._storage
    storage.set_trial_system_attr(trial_id, A_RESERVED, {**owner_record(), "at": time.time()})
    storage.set_trial_system_attr(trial_id, A_HEARTBEAT, time.time())
    storage.set_trial_state_values(trial_id, state=TrialState.WAITING)


def start_reserved(study: optuna.Study, trial_id: int) -> bool:
    """Its worker runs it: WAITING -> RUNNING (Optuna stamps datetime_start now)."""
    try:
        return bool(study._storage.set_trial_state_values(trial_id, state=TrialState.RUNNING))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def release(study: optuna.Study, trial_id: int) -> None:
    """A reserved trial that never started goes back to the queue for any driver."""
    try:
        study._storage.set_trial_system_attr(trial_id, A_RESERVED, None)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def _reserved_by_live_driver(t: FrozenTrial, now: float) -> bool:
    r = t.system_attrs.get(A_RESERVED)
    return bool(r) and owner_alive(r, t.system_attrs.get(A_HEARTBEAT), now)


def signature(space: Space) -> dict[str, Any]:
    """What must agree between runs of one study for its trials to be comparable."""
    data = dict(space.data.__dict__)
    data.pop("cache_dir", None)
    return {
        "objectives": [o.to_dict() for o in space.objectives],
        "data": data,
        "seeds": space.seeds,
        # a CVFP base gives the dict it always gave; another family adds its name and config
        "base": space.base.identity() | {"engine": {"precision": space.base.engine.precision}},
    }


def signature_differences(stored: dict[str, Any], sig: dict[str, Any], limit: int = 10) -> str:
    """The fields where a study's stored signature and this space's differ, by the space
    file's dotted names (``phase1.lr: 0.002 in the study, 0.01 here``), at most ``limit``."""
    def text(v: Any) -> str:
        t = "unset" if v is None else json.dumps(v, sort_keys=True, default=str)
        return t if len(t) <= 80 else t[:77] + "..."

    found: list[str] = []

    def walk(old: Any, new: Any, path: str) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for key in dict.fromkeys([*new, *old]):
                walk(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        elif json.dumps(old, sort_keys=True, default=str) != json.dumps(new, sort_keys=True, default=str):
            name = path.removeprefix("base.")  # the run settings: model.*, phase1.*, ... as in the file
            found.append(f"{name}: {text(old)} in the study, {text(new)} here")

    walk(stored, sig, "")
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more if found else "its signature's format"


def signature_hash(sig: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stored_signature(study: optuna.Study) -> dict[str, Any] | None:
    """The signature a study was created with: a study system attribute (studies made before
    it moved there keep it among their user attributes)."""
    stored = study._storage.get_study_system_attrs(study._study_id).get(A_SIGNATURE)
    return stored if stored is not None else study.user_attrs.get(A_SIGNATURE)


def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid)}


def owner_alive(owner: dict[str, Any] | None, heartbeat: float | None, now: float) -> bool:
    """Is the driver that runs this trial alive? Exact on this host, by heartbeat elsewhere."""
    if owner and owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid", -1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OverflowError):
            pass
        start = _proc_start(pid)  # a recycled pid has another start time
        return start is None or owner.get("start") in (None, start)
    return heartbeat is not None and now - heartbeat < GRACE_S


@dataclass
class Reconciled:
    failed_stale: list[int] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)


def create_or_load(space: Space, storage, study_name: str) -> optuna.Study:
    """Create the study, or load it and check it was made for the same objectives/data."""
    try:
        sampler, pruner = make_sampler(space), make_pruner(space)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampler/early_stopping: {e}") from None
    sig = signature(space)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if study_name in existing:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        if [d.name.lower() for d in study.directions] != space.directions:
            raise ConfigError(
                f"study {study_name!r} exists with directions {[d.name.lower() for d in study.directions]}, "
                f"the space asks for {space.directions}; use another --study name"
            )
        stored = stored_signature(study)
        if stored and stored.get("hash") != signature_hash(sig):
            raise ConfigError(
                f"study {study_name!r} was made with other settings than this space file ({signature_differences(stored['value'], sig)}); "
                "its trials would not be comparable. Use another --study name (or the space the study was made with)."
            )  # fmt: skip
        return study
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, directions=space.directions, sampler=sampler, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:  # another process created it just now
        return create_or_load(space, storage, study_name)
    # a system attribute: the dashboard's user attributes stay readable (it is a page of JSON)
    study._storage.set_study_system_attr(study._study_id, A_SIGNATURE, {"hash": signature_hash(sig), "value": sig})
    study.set_user_attr("objectives", [o.label for o in space.objectives])
    study.set_user_attr("sizes", space.data.sizes)
    study.set_user_attr("size_unit", space.data.size_unit)
    study.set_user_attr("data_source", space.data.source)
    study.set_user_attr("sampler", space.sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.label for o in space.objectives])  # objective names in the dashboard
    return study


def fail_stale(study: optuna.Study, now: float | None = None) -> list[FrozenTrial]:
    """Fail RUNNING trials whose driver is gone; return them (their configs get re-queued)."""
    now = time.time() if now is None else now
    storage = study._storage
    stale = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(A_OWNER)
        beat = t.system_attrs.get(A_HEARTBEAT)
        if owner is None and beat is None:
            # not ours (a plain optuna optimize() of another tool, or pre-bookkeeping)
            beat = t.datetime_start.timestamp() if t.datetime_start else None
        if owner_alive(owner, beat, now):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", "stale: its driver process died or stopped sending heartbeats")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            stale.append(t)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process finished or failed it meanwhile
    return stale


def reconcile(study: optuna.Study, space: Space, max_failures: int | None = None) -> Reconciled:
    """Fail stale trials and queue every config (grid / warm start / stale retry) that has no
    COMPLETE, PRUNED, WAITING or live RUNNING trial. Call under study_lock."""
    out = Reconciled()
    stale = fail_stale(study)
    out.failed_stale = [t.number for t in stale]
    trials = study.get_trials(deepcopy=False)
    present = {}
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING, TrialState.RUNNING):
            present.setdefault(trial_key(t), t.state)
    wanted: dict[str, dict[str, Any]] = {name: full_params(space, p) for name, p in space.configs.items()}
    # stale trials of sampled configs are retried too
    for t in stale:
        name = t.user_attrs.get("config_name") or f"retry_of_{t.number}"
        params = t.system_attrs.get("fixed_params") or t.params
        if params:
            wanted.setdefault(name, dict(params))
    for name, params in wanted.items():
        key = params_key(params)
        state = present.get(key)
        if state in (TrialState.COMPLETE, TrialState.PRUNED):
            out.done.append(name)
        elif state in (TrialState.WAITING, TrialState.RUNNING):
            out.pending.append(name)
        else:
            enqueue(study, name, params)
            present[key] = TrialState.WAITING
            out.queued.append(name)
    return out


def enqueue(study: optuna.Study, name: str, params: dict[str, Any], retry_of: int | None = None) -> None:
    attrs: dict[str, Any] = {"config_name": name}
    if retry_of is not None:
        attrs["retry_of"] = retry_of
    study.enqueue_trial(params, user_attrs=attrs)


def pop_waiting(study: optuna.Study, cost: Callable[[dict[str, Any]], float] | None = None) -> optuna.Trial | None:
    """Take a queued trial (atomically: another process cannot take the same one).

    Without ``cost``, the oldest first. With it, the costliest first by ``cost(params)``
    (the queue's own order breaking ties): when several workers share a queue, starting the
    long trials first keeps one long trial from running alone at the end. Trials a live
    driver reserved for a Ray trial that has not started are skipped; a dead driver's are
    taken."""
    storage = study._storage
    now = time.time()
    waiting = [t for t in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
               if not _reserved_by_live_driver(t, now)]  # fmt: skip
    if cost is not None:
        waiting = sorted(waiting, key=lambda t: -_cost_of(cost, t))
    for t in waiting:
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        return optuna.Trial(study, t._trial_id)
    return None


def _cost_of(cost: Callable[[dict[str, Any]], float], t: FrozenTrial) -> float:
    params = t.system_attrs.get("fixed_params") or t.params
    try:
        return float(cost(dict(params)))
    except Exception:  # a config the estimate cannot read runs in queue order
        return 0.0
