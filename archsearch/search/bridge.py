"""Optuna study <-> Ray Tune: who asks, who reports, who decides, who tells.

Replaces Ray's ``OptunaSearch``, which (read its source) tells a scheduler-stopped trial
COMPLETE with a low-fidelity value, re-enqueues ``points_to_evaluate`` on every start,
writes no user attributes, and gets no heartbeat from Optuna for ask/tell trials. Here:

- :class:`StudySearcher` (a Ray ``Searcher``) takes queued trials first (grid points, warm
  starts, retries; each popped atomically), then asks the sampler for new ones up to the
  run's budget; it tells every finished trial with the right state: COMPLETE with its
  objective(s), PRUNED when the pruner stopped it, FAIL with the cause when it raised.
- :class:`PrunerScheduler` (a Ray FIFO scheduler) is the one component that decides early
  stopping: after each size it reports the partial-fit objective to the Optuna trial
  (step = cumulative training tokens) and asks the study's pruner.
- a heartbeat thread stamps every live trial, so a later run can tell a dead driver's
  RUNNING trials from another driver's live ones (see study.fail_stale).
- a trial handed to Ray waits WAITING (reserved for this driver) until its worker reports
  that it started; only then is it RUNNING, with Optuna's start time.
- a proposal equal to a config already in the study is a *repeat*: answered from the study
  (told the original's value or state, so the sampler learns from it; user attr
  ``repeat_of``), not run, not counted in the run's budget. ``MAX_REPEATS`` in a row with
  nothing running and the search stops: the space is exhausted.
- the space's rules on finished trials (``admissible``, ``capped: infeasible``) become
  Optuna constraints (``Trial.set_constraint``; user attr ``constraint_values`` for
  Optuna 4's constraints_func), so TPE and NSGA-II learn where the infeasible configs are.
Only the driver writes to storage. The runner hands the bridge the plan builder (a trial's
plan from its params) and the artifacts callback (a finished trial's plot and table): the
search layer draws nothing; it writes each finished trial's dashboard note and hands the
callback's files to the experiment trackers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from archsearch.errors import UserError, is_disk_full
from archsearch.report.artifacts import TrialFile
from archsearch.result import SizeRecord
from archsearch.search import study as st
from archsearch.search.distributions import family_params, search_distributions, suggest_all
from archsearch.search.notes import capped_text
from archsearch.space import Space, config_label
from archsearch.trial import TrialPlan

MAX_INFEASIBLE = 200
MAX_REPEATS = 50
"""Proposals in a row that repeat configs already in the study before a search stops as
"space exhausted"."""

PlanFn = Callable[..., TrialPlan]
"""make_plan(params, name=...) -> the trial's plan (archsearch.plan.trial_plan, bound to the run)."""


ArtifactsFn = Callable[[optuna.Trial, str, list[SizeRecord], dict[str, Any] | None, Path], Sequence[TrialFile] | None]
"""artifacts(trial, config_name, records, fit, folder): draw and store the views of a finished
trial (plot, per-size table) in ``folder``, a temporary folder the bridge removes once the
trackers have copied the files; returns the files (archsearch.report.artifacts.TrialArtifacts)."""


@dataclass
class LiveTrial:
    trial: optuna.Trial
    name: str
    params: dict[str, Any]
    handed_out: float = field(default_factory=time.time)
    started: float = field(default_factory=time.time)
    seq: int = 0
    records: list[SizeRecord] = field(default_factory=list)
    partial: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    pruned: str | None = None
    pid: int | None = None
    running: bool = False
    """Its worker has started it (before that it is WAITING in the study, pending in the view)."""

    @property
    def number(self) -> int:
        return self.trial.number


@dataclass
class Outcome:
    number: int
    name: str
    params: dict[str, Any]
    state: str
    values: list[float] | None
    reason: str | None = None
    cached: bool = False
    kind: str | None = None
    """For FAIL: what failed (the exception's type, out_of_memory, cuda_error, worker_died, interrupted)."""
    started: float | None = None
    ended: float | None = None
    """Wall-clock times (epoch seconds) its worker started it and the driver recorded its end."""
    handed_out: float | None = None
    """When the driver handed it to Ray (the order of hand-out: largest queued configs first)."""
    pid: int | None = None
    """The worker process that ran it."""


class StudyBridge:
    def __init__(self, study: optuna.Study, space: Space, make_plan: PlanFn, n_new: int, embed_dim: int,
                 artifacts: ArtifactsFn | None = None, view=None, trackers=None, scratch_dir: Path | None = None):  # fmt: skip
        self.study = study
        self.space = space
        self.make_plan = make_plan
        self.n_new = n_new
        self.embed_dim = embed_dim
        self.artifacts = artifacts
        self.scratch_dir = scratch_dir
        """Where the temporary folders of the artifacts are made (None: the system's)."""
        self.view = view
        self.trackers = trackers
        """archsearch.tracking.Trackers: MLflow/TensorBoard/W&B copies of each trial (or None)."""
        self.dists = search_distributions(space)
        self.live: dict[str, LiveTrial] = {}
        self.outcomes: list[Outcome] = []
        self.asked_new = 0
        self.waiting_repeats: dict[int, list[tuple[optuna.Trial, dict[str, Any]]]] = {}
        """Repeats of a trial still running here, told its outcome when it ends."""
        self.repeats_in_a_row = 0
        self.repeats = 0
        self.exhausted: str | None = None
        """Why the search stopped early ("space exhausted: ..."), else None."""
        self.failures: Counter[str] = Counter()
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="archsearch-heartbeat", daemon=True)
        self._beat.start()

    # -- heartbeat -----------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(st.HEARTBEAT_S):
            with self.lock:
                ids = [lt.trial._trial_id for lt in self.live.values()]
                ids += [t._trial_id for waiting in self.waiting_repeats.values() for t, _ in waiting]
            for tid in ids:
                try:
                    self.study._storage.set_trial_system_attr(tid, st.A_HEARTBEAT, time.time())
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass
                except Exception:  # a storage hiccup must not kill the heartbeat
                    pass

    def close(self) -> None:
        self._stop.set()

    # -- suggest -------------------------------------------------------------------------
    def suggest(self, ray_id: str) -> dict[str, Any] | str | None:
        with self.lock:
            if self.lost is not None or self.halted:
                return Searcher.FINISHED
            trial = st.pop_waiting(self.study, cost=self.cost)
            if trial is None:
                if self.asked_new >= self.n_new or self.exhausted:
                    return None if self.live else Searcher.FINISHED
                if self.repeats_in_a_row >= MAX_REPEATS:
                    return None  # only repeats lately: wait for a running trial to finish first
                trial = self._ask_distinct()
                if trial is None:  # exhausted, or waiting for a running trial
                    return None if self.live else Searcher.FINISHED
                self.asked_new += 1
            params = suggest_all(trial, self.dists)
            name = trial.user_attrs.get("config_name") or config_label(family_params(self.space, params))  # a proposal: named as a grid's points
            if "config_name" not in trial.user_attrs:
                trial.set_user_attr("config_name", name)
            storage = self.study._storage
            storage.set_trial_system_attr(trial._trial_id, st.A_OWNER, st.owner_record())
            st.reserve(self.study, trial._trial_id)  # WAITING until its worker starts it
            self.live[ray_id] = LiveTrial(trial, name, params)
            plan = self.make_plan(params, name=name)
            self._view("pending", self.live[ray_id])
            return {"plan": dataclasses.asdict(plan), "gpus": self.plan_gpus, "cpus": self.space.cpus, "memory_gb": self.space.memory_gb, "optuna_trial": trial.number}

    @property
    def progress(self) -> tuple[int, int]:
        """(trials of this run done, trials this run will do as far as known now)."""
        done = sum(1 for o in self.outcomes if o.state != "REPEAT")
        queued = len(self.study._storage.get_all_trials(self.study._study_id, deepcopy=False, states=(TrialState.WAITING,)))
        pending_new = 0 if self.exhausted else max(0, self.n_new - self.asked_new)
        live_waiting = sum(1 for lt in self.live.values() if not lt.running)
        return done, done + len(self.live) + max(0, queued - live_waiting) + pending_new

    plan_gpus: float = 0.0
    vocab_size: int = 0
    """V of the embedding (a family that trains its embedding counts V x E parameters)."""
    lost: str | None = None
    halted: str | None = None
    """Why the run stops early (a full disk, see :meth:`halt`)."""
    """Why the Ray cluster is gone (see :meth:`cluster_lost`); no trial starts after that."""

    def cost(self, params: dict[str, Any]) -> float:
        """A queued config's relative cost, to start the largest first: its parameter count
        (phase 1 + phase 2), which orders the report's four configs as their trial times do."""
        from archsearch.config import run_param_counts

        return float(run_param_counts(self.space.run_config(params), self.embed_dim, self.vocab_size)["total_params"])

    def _ask_distinct(self) -> optuna.Trial | None:
        """A new proposal that is no repeat; repeats on the way are answered from the study.
        None once MAX_REPEATS proposals in a row were repeats: with trials still running the
        search waits for one to finish (the sampler may have kept proposing a running one;
        the count starts again when a trial finishes); with none, the space is exhausted."""
        while True:
            trial = self._ask_feasible()
            params = dict(trial.params)
            original = self._original_of(params, trial.number)
            if original is None:
                self.repeats_in_a_row = 0
                return trial
            self._answer_repeat(trial, params, original)
            self.repeats += 1
            self.repeats_in_a_row += 1
            if self.repeats_in_a_row >= MAX_REPEATS:
                if self.live:
                    return None
                self.exhausted = (f"space exhausted: the sampler proposed {MAX_REPEATS} configs in a row that the study "
                                  f"already holds; {self.distinct_evaluated()} distinct configs evaluated")  # fmt: skip
                return None

    def distinct_evaluated(self) -> int:
        """Distinct configs with a COMPLETE or PRUNED trial of their own (repeats aside)."""
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        return len({self._key(st.trial_key_params(t)) for t in self.study.get_trials(deepcopy=False, states=done)
                    if t.user_attrs.get("repeat_of") is None})  # fmt: skip

    def _key(self, params: dict[str, Any]) -> str:
        """A config's identity for repeats: the params its run uses (family_params), floats
        rounded (study.config_key)."""
        return st.config_key(family_params(self.space, params))

    def _original_of(self, params: dict[str, Any], number: int) -> FrozenTrial | None:
        """The study's own trial of this config: COMPLETE first, then PRUNED, then one still
        pending or running; None when the config is new (failed trials do not count)."""
        key = self._key(params)
        rank = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 2}
        best: FrozenTrial | None = None
        for t in self.study.get_trials(deepcopy=False):
            if t.number == number or t.state not in rank or t.user_attrs.get("repeat_of") is not None:
                continue
            if self._key(st.trial_key_params(t)) == key and (best is None or rank[t.state] < rank[best.state]):
                best = t
        return best

    def _answer_repeat(self, trial: optuna.Trial, params: dict[str, Any], original: FrozenTrial) -> None:
        """Tell a repeat what the study knows of its config, without running it."""
        name = original.user_attrs.get("config_name") or f"trial_{original.number}"
        trial.set_user_attr("repeat_of", original.number)
        trial.set_user_attr("config_name", name)
        if original.user_attrs.get("infeasible") is not None:
            trial.set_user_attr("infeasible", original.user_attrs["infeasible"])
        set_constraints(trial, original.user_attrs.get("constraint_values") or {})
        if original.state == TrialState.COMPLETE:
            self.study.tell(trial, values=original.values)
            state, values, reason = "REPEAT", original.values, f"repeat of trial {original.number} ({name}): its value, not run"
        elif original.state == TrialState.PRUNED:
            for step, v in sorted(original.intermediate_values.items()):
                trial.report(v, step)
            trial.set_user_attr("pruned_reason", f"repeat of trial {original.number} ({name}), which was pruned")
            self.study.tell(trial, state=TrialState.PRUNED)
            state, values, reason = "REPEAT", None, f"repeat of pruned trial {original.number} ({name}), not run"
        elif original.number in {lt.number for lt in self.live.values()}:
            # still pending or running here: it waits (WAITING, reserved) and is told the
            # original's outcome when that one finishes
            st.reserve(self.study, trial._trial_id)
            self.waiting_repeats.setdefault(original.number, []).append((trial, params))
            self._view_repeat(trial.number, name, params, f"repeat of trial {original.number} ({name}), still running: answered when it ends")
            return
        else:  # failed, or still running under another driver: the study has no value for it
            how = {TrialState.FAIL: "failed", TrialState.WAITING: "did not run (interrupted)"}.get(original.state, "was still running elsewhere")
            trial.set_user_attr("fail_reason", f"repeat of trial {original.number} ({name}), which {how}")
            self.study.tell(trial, state=TrialState.FAIL)
            state, values, reason = "REPEAT", None, f"repeat of trial {original.number} ({name}), which {how}; not run"
        self.outcomes.append(Outcome(trial.number, name, params, state, values, reason))
        self._view_repeat(trial.number, name, params, reason)

    def _ask_feasible(self) -> optuna.Trial:
        for _ in range(MAX_INFEASIBLE):
            trial = st.ask_new(self.study)
            params = suggest_all(trial, self.dists)
            problems = self.space.constraint_violations(params, self.embed_dim, self.vocab_size)
            if not problems:
                return trial
            trial.set_user_attr("pruned_reason", "infeasible: " + "; ".join(problems))
            trial.set_user_attr("config_name", config_label(family_params(self.space, params)))
            self.study.tell(trial, state=TrialState.PRUNED)
            self.outcomes.append(Outcome(trial.number, config_label(family_params(self.space, params)), params, "PRUNED", None, "infeasible: " + "; ".join(problems)))
        raise UserError(f"constraints: {MAX_INFEASIBLE} proposals in a row violated {self.space.constraints}; widen the constraints or narrow the parameters")

    # -- results -------------------------------------------------------------------------
    def on_result(self, ray_id: str, result: dict[str, Any]) -> bool:
        """Record one reported event; True when the trial should stop (pruned, or the run is
        halting on a full disk)."""
        with self.lock:
            if self.halted:
                return True
            try:
                return self._on_result(ray_id, result)
            except Exception as e:
                if not is_disk_full(e):
                    raise
                self.halt(f"the disk is full: {e}")
                return True

    def halt(self, reason: str) -> None:
        """Stop the run after a write failed for want of space (the study storage, the run
        cache): no trial starts, every live one is stopped and ends FAIL ``disk_full``."""
        with self.lock:
            self.halted = self.halted or reason.splitlines()[0][:500]
            for lt in self.live.values():
                if lt.error is None:
                    lt.error = {"error": self.halted, "kind": "disk_full"}

    def _on_result(self, ray_id: str, result: dict[str, Any]) -> bool:
        with self.lock:
            lt = self.live.get(ray_id)
            if lt is None or result.get("seq", 0) <= lt.seq:
                return False  # a repeated final result
            lt.seq = result["seq"]
            lt.pid = result.get("pid") or lt.pid
            if result.get("node") and "ray_node" not in lt.trial.user_attrs:
                lt.trial.set_user_attr("ray_node", result["node"])  # which Ray node ran it
                lt.trial.set_user_attr("worker_pid", result.get("pid"))
            event = result.get("archsearch_event")
            payload = json.loads(result.get("payload") or "{}")
            self._mark_running(lt)  # any event means its worker runs it
            if event == "started":
                return False
            if event == "failed":
                lt.error = payload
                if payload.get("kind") == "disk_full":
                    self.halt(f"the disk is full: trial {lt.number}'s worker could not write ({payload.get('error')})")
                    lt.error = dict(payload, error=self.halted)
                return False
            if event == "final":
                lt.result = payload
                return False
            if event == "progress":
                self._view("progress", lt, reason=f"size {payload['size_index'] + 1}/{len(self.space.data.sizes)}: {payload['text']}")
                return False
            if event != "size":
                return False
            lt.records.append(SizeRecord.from_dict(payload["record"]))
            lt.partial = payload["partial"]
            trial = lt.trial
            trial.set_user_attr("sizes", [r.to_dict() for r in lt.records])
            trial.set_user_attr("sizes_done", len(lt.records))
            capped = capped_text(lt.records)
            if capped:
                trial.set_user_attr("capped", capped)
            retried = [f"{r.size:,} {r.size_unit}: trained again with {r.retried}" for r in lt.records if getattr(r, "retried", None)]
            if retried:
                trial.set_user_attr("retried", retried)
            self._view("size", lt)
            if self.trackers:
                self._tracking_errors(lt, self.trackers.size(lt.number, lt.name, lt.params, lt.records[-1]))
            value = result.get("objective")
            last = len(lt.records) >= len(self.space.data.sizes)
            if len(self.study.directions) > 1 or value is None or not math.isfinite(value):
                return False
            trial.report(float(value), step=int(result["step"]))
            if not last and trial.should_prune():
                lt.pruned = f"the {self.space.early_stopping['pruner']} pruner stopped it after {len(lt.records)} of {len(self.space.data.sizes)} sizes (objective {value:.4g} at {int(result['step']):,} cumulative tokens)"
                return True
            return False

    def on_error(self, ray_id: str, text: str | None) -> None:
        with self.lock:
            lt = self.live.get(ray_id)
            if lt is not None and lt.error is None:
                lt.error = ray_failure(text)

    def _mark_running(self, lt: LiveTrial) -> None:
        if lt.running:
            return
        lt.running = True
        lt.started = time.time()
        st.start_reserved(self.study, lt.trial._trial_id)
        self._view("start", lt)

    def on_complete(self, ray_id: str, error: bool = False) -> None:
        with self.lock:
            lt = self.live.pop(ray_id, None)
            if lt is None:
                return
            self.repeats_in_a_row = 0  # a result: the sampler's next proposals may differ
            if not lt.running and lt.error is not None and lt.error.get("kind") == "interrupted":
                st.release(self.study, lt.trial._trial_id)  # never started: back to the queue, still WAITING
                self._view("end", lt, state="WAITING", values=None, reason="never started; queued for the next run")
                self._answer_waiting_repeats(lt.number)  # an unfinished original: they fail
                return
            if not lt.running:  # Ray gave up on it before its worker ran it: record what happened
                st.start_reserved(self.study, lt.trial._trial_id)
            try:
                self._finish(lt, error)
            except Exception as e:  # never leave a trial RUNNING because telling it failed
                kind = "disk_full" if is_disk_full(e) else (lt.error or {}).get("kind")
                if kind == "disk_full":
                    self.halt(f"the disk is full: {e}")
                try:
                    lt.trial.set_user_attr("error", f"archsearch could not record the result: {e}")
                    if kind:
                        lt.trial.set_user_attr("error_kind", kind)
                    self.study.tell(lt.trial, state=TrialState.FAIL)
                except Exception:  # the storage cannot take it either: the trial stays RUNNING, and the next run fails it as stale
                    pass
                self.outcomes.append(Outcome(lt.number, lt.name, lt.params, "FAIL", None, str(e).splitlines()[0][:500], kind=kind))

    def _finish(self, lt: LiveTrial, error: bool) -> None:
        trial = lt.trial
        records = [SizeRecord.from_dict(r) for r in (lt.result or lt.partial or {}).get("sizes") or []] or lt.records
        if records:
            trial.set_user_attr("sizes", [r.to_dict() for r in records])
        cached = bool(records) and all(r.cached for r in records)
        if lt.pruned:
            self._attrs(trial, lt.partial)
            trial.set_user_attr("pruned_reason", lt.pruned)
            self._views(lt, lt.partial, "PRUNED", lt.pruned)
            self.study.tell(trial, state=TrialState.PRUNED)
            self._done(lt, "PRUNED", None, lt.pruned, cached)
            return
        if lt.result is not None and lt.result.get("complete"):
            values = [lt.result["objectives"].get(o.label) for o in self.space.objectives]
            if all(v is not None and math.isfinite(v) for v in values):
                self._attrs(trial, lt.result)
                self._rules(trial, lt.result)  # before the views: the note names an infeasible trial
                self._views(lt, lt.result, "COMPLETE")
                self.study.tell(trial, values=values)
                self._done(lt, "COMPLETE", values, None, cached)
                return
            lt.error = {"error": f"objective is not finite: {values}", "kind": "non_finite"}
        if lt.error is None:
            lt.error = {"error": "the trial stopped before it finished (interrupted)" if not error else "the Ray worker died", "kind": "interrupted" if not error else "worker_died"}
        self._attrs(trial, lt.partial)
        trial.set_user_attr("error", lt.error.get("error"))
        trial.set_user_attr("error_kind", lt.error.get("kind"))
        if lt.error.get("traceback"):
            trial.set_user_attr("traceback", lt.error["traceback"])
        self._views(lt, lt.partial, "FAIL", lt.error.get("error"))
        self.study.tell(trial, state=TrialState.FAIL)
        self._done(lt, "FAIL", None, lt.error.get("error"), cached, lt.error.get("kind"))
        key = st.params_key(lt.params)
        self.failures[key] += 1
        if lt.error.get("kind") in ("interrupted", "cluster_lost", "disk_full") or self.failures[key] <= self.space.max_failures:
            st.enqueue(self.study, lt.name, lt.params, retry_of=lt.number)

    def _rules(self, trial: optuna.Trial, result: dict[str, Any]) -> None:
        """The space's rules on a finished trial, as Optuna constraints (<= 0 is feasible)."""
        sizes = [SizeRecord.from_dict(r) for r in result.get("sizes") or []]
        values, why = {}, []
        ratio_max = (self.space.admissible or {}).get("max_ppl_ratio")
        if ratio_max is not None and sizes:
            final = sizes[-1].val_ppl
            others = [t.user_attrs.get("final_ppl") for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                      if t.user_attrs.get("repeat_of") is None and t.user_attrs.get("final_ppl")]  # fmt: skip
            best = min([final, *others])
            ratio = final / best
            values["admissible_ppl_ratio"] = ratio - ratio_max
            trial.set_user_attr("admissibility", {"final_ppl": final, "best_final_ppl": best, "ppl_ratio": ratio, "max_ppl_ratio": ratio_max})
            if ratio > ratio_max:
                why.append(f"admissible.max_ppl_ratio: its PPL at the largest size ({final:.1f}) is {ratio:.2f}x the best so far ({best:.1f}), above {ratio_max:g}")
        if self.space.capped == "infeasible":
            n = sum(1 for r in sizes if r.capped)
            values["capped"] = float(n)
            if n:
                why.append(f"capped: infeasible: {n} of {len(sizes)} sizes hit a training cap ({'; '.join(capped_text(sizes))})")
        if why:
            trial.set_user_attr("infeasible", "; ".join(why))
        set_constraints(trial, values)

    def _done(self, lt, state, values, reason, cached, kind=None) -> None:
        self.outcomes.append(Outcome(lt.number, lt.name, lt.params, state, values, reason, cached, kind, started=lt.started, ended=time.time(),
                                     handed_out=lt.handed_out, pid=lt.pid))  # fmt: skip
        self._view("end", lt, state=state, values=values, reason=reason)
        self._answer_waiting_repeats(lt.number)

    def _answer_waiting_repeats(self, number: int) -> None:
        """The repeats that waited for trial ``number`` get its outcome now."""
        waiting = self.waiting_repeats.pop(number, [])
        if not waiting:
            return
        original = self.study._storage.get_trial(self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number))
        for trial, params in waiting:
            st.start_reserved(self.study, trial._trial_id)  # Optuna tells only RUNNING trials
            try:
                self._answer_repeat(trial, params, original)
            except Exception:  # never leave it WAITING for nothing
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    def _attrs(self, trial: optuna.Trial, result: dict[str, Any] | None) -> None:
        if not result:
            return
        fit = result.get("fit") or {}
        for k in ("alpha", "A", "r2", "alpha_se", "alpha_low", "alpha_high", "ci_method", "target_tokens", "ppl_at_target", "ppl_at_target_low", "ppl_at_target_high"):
            if fit.get(k) is not None:
                trial.set_user_attr(k, fit[k])
        if fit:
            trial.set_user_attr("fit", {k: v for k, v in fit.items() if k not in ("loo_alphas", "loo_intercepts")} | {
                "loo_alphas": fit.get("loo_alphas"), "loo_intercepts": fit.get("loo_intercepts")})
        sizes = [SizeRecord.from_dict(r) for r in result.get("sizes") or []]
        if sizes:
            last = sizes[-1]
            trial.set_user_attr("final_ppl", last.val_ppl)
            trial.set_user_attr("final_acc", last.val_acc)
            if last.metrics.get("val_er") is not None:  # a CVFP number
                trial.set_user_attr("val_er", last.metrics["val_er"])
            trial.set_user_attr("cache_hits", sum(1 for r in sizes if r.cached))
        for k in ("phase1_params", "phase2_params", "total_params", "device", "family"):
            if result.get(k) is not None:
                trial.set_user_attr(k, result[k])
        trial.set_user_attr("wall_seconds", result.get("seconds"))
        if (result.get("config") or {}).get("model"):  # the family's config as run: the report's Settings table
            trial.set_user_attr("model", result["config"]["model"])
        if result.get("worker"):  # where the worker's time went before the trial ran (see trainable)
            trial.set_user_attr("worker", result["worker"])
        trial.set_user_attr("objectives", result.get("objectives"))

    def _views(self, lt: LiveTrial, result: dict[str, Any] | None, state: str, reason: str | None = None) -> None:
        """What is read of a finished trial besides its attributes: the plot and per-size table
        (the artifacts callback draws and stores them), its note, and the trackers' copies.
        They are views of numbers the trial keeps: failing to draw or store them (no
        matplotlib, a full disk, a tracker down) is a warning and an attribute, never a failed
        trial."""
        try:
            records = [SizeRecord.from_dict(r) for r in (result or {}).get("sizes") or []] or lt.records
        except Exception as e:
            logging.getLogger(__name__).warning("trial %d: its size records cannot be read for the dashboard views (%s: %s)", lt.number, type(e).__name__, e)
            return
        fit = (result or {}).get("fit")
        tmp_root = None
        if self.scratch_dir is not None:  # written under the home, like every other write
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
            tmp_root = self.scratch_dir
        with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:  # the files live until the trackers copied them
            files: list[TrialFile] = []
            if self.artifacts is not None and records:
                try:
                    files = list(self.artifacts(lt.trial, lt.name, records, fit, Path(tmp)) or [])
                except Exception as e:
                    text = f"{type(e).__name__}: {e}"
                    logging.getLogger(__name__).warning("trial %d: could not write its plot and table for the dashboard (%s)", lt.number, text)
                    lt.trial.set_user_attr("artifact_error", text[:500])
            plot_url = next((f.url for f in files if f.mimetype == "image/png" and f.url), None)
            try:
                self._note(lt, fit, records, state, reason, plot_url)
            except Exception as e:
                logging.getLogger(__name__).warning("trial %d: could not write its dashboard note (%s: %s)", lt.number, type(e).__name__, e)
            if self.trackers:
                from archsearch.tracking import TrialLog

                log = TrialLog(self.study.study_name, lt.number, lt.name, lt.params, state, records, fit,
                               (result or {}).get("objectives") or {}, reason, self.space.run_config(lt.params).to_dict(),
                               [f.path for f in files])  # fmt: skip
                self._tracking_errors(lt, self.trackers.finish(log))

    def _tracking_errors(self, lt: LiveTrial, errors: list[str]) -> None:
        if errors:
            lt.trial.set_user_attr("tracking_error", "; ".join(errors)[:1000])

    def _note(self, lt: LiveTrial, fit: dict[str, Any] | None, records: list, state: str, reason: str | None, plot_url: str | None) -> None:
        import optuna_dashboard

        from archsearch.objectives import DEFAULT_TARGET_TOKENS
        from archsearch.search.notes import note_flags, trial_note

        target = next((o.target_tokens for o in self.space.objectives if o.name == "ppl_at" and o.target_tokens), DEFAULT_TARGET_TOKENS)
        flags = note_flags(records, fit, lt.trial.user_attrs.get("infeasible"))
        optuna_dashboard.save_note(lt.trial, trial_note(lt.number, lt.name, state, lt.params, records, fit, target, plot_url, reason, flags))

    def cluster_lost(self, reason: str) -> list[int]:
        """The Ray cluster is gone (its raylet or GCS died, or stopped answering): every live
        trial ends FAIL ``cluster_lost`` and is queued again for the next run."""
        with self.lock:
            self.lost = reason
            ids = list(self.live)
            for ray_id in ids:
                lt = self.live.get(ray_id)
                if lt is not None:
                    lt.error = {"error": f"the Ray cluster was lost while the trial ran ({reason}); queued again for the next run",
                                "kind": "cluster_lost"}  # fmt: skip
                self.on_complete(ray_id, error=True)
        return [o.number for o in self.outcomes if o.kind == "cluster_lost"]

    def fail_unfinished(self, reason: str) -> list[int]:
        """After an interrupted run: fail what is still live and queue it again."""
        with self.lock:
            ids = list(self.live)
        for ray_id in ids:
            lt = self.live.get(ray_id)
            if lt is not None and lt.error is None:
                lt.error = {"error": reason, "kind": "interrupted"}
            self.on_complete(ray_id, error=False)
        with self.lock:
            for number in list(self.waiting_repeats):
                self._answer_waiting_repeats(number)
        return [o.number for o in self.outcomes if o.reason == reason]

    def _view(self, event: str, lt: LiveTrial, **info: Any) -> None:
        if self.view is not None:
            try:
                self.view.progress = self.progress
                self.view.update(event, lt, **info)
            except Exception:
                pass

    def _view_repeat(self, number: int, name: str, params: dict[str, Any], reason: str) -> None:
        if self.view is not None:
            try:
                self.view.repeat(number, name, params, reason)
            except Exception:
                pass


def set_constraints(trial: optuna.Trial, values: dict[str, float]) -> None:
    """Named constraint values (<= 0 feasible) on a trial before it is told: Optuna 5's
    ``Trial.set_constraint``, which its samplers read; with Optuna 4, the sampler's
    constraints_func reads the ``constraint_values`` user attr (distributions.TrialConstraints)."""
    if not values:
        return
    trial.set_user_attr("constraint_values", dict(values))
    if hasattr(trial, "set_constraint"):
        for key, v in values.items():
            trial.set_constraint(key, v)


def ray_failure(text: str | None) -> dict[str, Any]:
    """What a trial's Ray-level failure was, from the text Ray Tune saved for it: the memory
    monitor killing the worker (``out_of_memory``, with Ray's reason: the node's memory use
    against the threshold) or any other death of the worker (``worker_died``)."""
    text = (text or "").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Failure # ")]
    if "OutOfMemoryError" in text or "running low on memory" in text:
        reason = next((ln for ln in lines if "running low on memory" in ln), lines[0] if lines else "")
        reason = reason.removeprefix("ray.exceptions.OutOfMemoryError: ")
        detail = next((ln for ln in lines if ln.startswith("OOM kill reason:")), "")
        message = f"Ray's memory monitor killed the trial's worker: {reason}" + (f" ({detail})" if detail else "")
        return {"error": message[:1000], "kind": "out_of_memory", "traceback": text[-4000:]}
    return {"error": (lines[-1] if lines else "the Ray worker died"), "kind": "worker_died", "traceback": text[-4000:]}


def saved_error(trial) -> str | None:
    """The plain-text error Ray Tune wrote for a trial (nothing is unpickled). Tune writes it
    in the driver's staging folder first; ``get_error`` reads the synced copy, which may not
    be there yet."""
    for read in (lambda: Path(trial.error_file).read_text(errors="replace") if trial.error_file else None, trial.get_error):
        try:
            text = read()
        except Exception:
            continue
        if isinstance(text, str) and text.strip():
            return text
    return None


class _Unpicklable:
    """Ray pickles its search algorithm and scheduler for Tuner.restore, which archsearch does
    not use (the study is the state). The bridge (locks, threads, storage) stays out."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state["bridge"] = None
        return state


class StudySearcher(_Unpicklable, Searcher):
    def __init__(self, bridge: StudyBridge):
        super().__init__()
        self.bridge = bridge

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        return self.bridge.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # the scheduler records results (it sees them first, including the final one)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.bridge.on_complete(trial_id, error=error)


class PrunerScheduler(_Unpicklable, FIFOScheduler):
    def __init__(self, bridge: StudyBridge):
        super().__init__()
        self.bridge = bridge

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return TrialScheduler.STOP if self.bridge.on_result(trial.trial_id, result) else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if result:
            self.bridge.on_result(trial.trial_id, result)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.bridge.on_error(trial.trial_id, saved_error(trial))

