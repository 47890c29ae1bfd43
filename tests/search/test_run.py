"""archsearch run: real Ray (local, 2 CPUs) and real Optuna SQLite storage."""

from __future__ import annotations

import math

import optuna
import pytest
from helpers import tiny_space
from optuna.trial import TrialState

from archsearch.config import param_counts
from archsearch.scaling import fit_power_law
from archsearch.search.runner import run_search
from archsearch.space import parse_space
from archsearch.timing import OVERLAPPED

SIZES = [400, 800, 1600]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def run(space: dict, **kw):
    return run_search(parse_space(space), view_mode="quiet", **kw)


def load(home, name="tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'archsearch.db'}")


def test_grid_study_gets_exactly_its_configs_complete_with_attributes(home, tiny_corpus, ray_local):
    space = tiny_space(tiny_corpus)
    summary = run(space)
    assert not summary.failed and not summary.interrupted
    study = load(home)
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    by_name = {t.user_attrs["config_name"]: t for t in trials}
    assert set(by_name) == {"a", "b"}
    for name, cfg in space["sampler"]["configs"].items():
        t = by_name[name]
        assert t.params == cfg  # params are exactly the searched fields
        sizes = t.user_attrs["sizes"]
        assert [s["train_tokens"] for s in sizes] == SIZES
        fit = fit_power_law([s["train_tokens"] for s in sizes], [s["val_ppl"] for s in sizes])
        assert t.values == [pytest.approx(fit.alpha)]
        assert t.user_attrs["alpha"] == pytest.approx(fit.alpha)
        assert t.user_attrs["r2"] == pytest.approx(fit.r2)
        assert t.user_attrs["alpha_low"] < fit.alpha < t.user_attrs["alpha_high"]
        assert t.user_attrs["A"] == pytest.approx(fit.A)
        from archsearch.config import run_config_from_dict

        counts = param_counts(run_config_from_dict({"model": cfg}).model, 8)
        assert t.user_attrs["phase1_params"] == counts["phase1_params"]
        assert t.user_attrs["total_params"] == counts["total_params"]
        assert t.user_attrs["device"] == "cpu" and t.user_attrs["wall_seconds"] > 0
        assert t.user_attrs["final_ppl"] == pytest.approx(sizes[-1]["val_ppl"])
        # intermediate values: the partial-fit objective, step = cumulative training tokens
        assert sorted(t.intermediate_values) == [SIZES[0] + SIZES[1], sum(SIZES)]
        assert t.intermediate_values[sum(SIZES)] == pytest.approx(fit.alpha)
        # artifacts the dashboard shows: the log-log plot and the per-size table
        metas = optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)
        assert sorted(m.mimetype for m in metas) == ["image/png", "text/csv"]
    assert study.metric_names == ["alpha"]
    # the larger config (b: 2 layers, 2 input tokens) is handed out first; the run says where its time went
    handed = {o.name: o.handed_out for o in summary.outcomes}
    assert handed["b"] < handed["a"]
    assert all(o.started < o.ended and o.pid for o in summary.outcomes)
    for t in trials:  # the worker that ran it, and how long it had been up when the trial began
        w = t.user_attrs["worker"]
        assert w["pid"] == t.user_attrs["worker_pid"] and w["process_age_s"] >= 0 and w["imports_s"] >= 0
        assert "warmup" not in w  # a CPU trial has no warm-up thread (ARCHSEARCH_WORKER_WARMUP=auto)
    # contiguous laps from run_search's start (data and the imports: in threads beside them, not laps); they cover the run's seconds
    assert list(summary.timings) == ["checks", "ray_init", "data", "warm_imports", "data_wait", "study", "trials", "late_imports", "record", "publish"]
    assert all(v >= 0 for v in summary.timings.values()) and summary.timings["trials"] < summary.seconds
    laps = sum(v for k, v in summary.timings.items() if k not in OVERLAPPED)
    assert summary.seconds - 0.05 <= laps <= summary.seconds + 0.05


def test_rerun_adds_no_trial(home, tiny_corpus, ray_local):
    space = tiny_space(tiny_corpus)
    run(space)
    first = {t.number: t.values for t in load(home).get_trials()}
    second = run(space)
    assert second.outcomes == [] and set(second.done_before) == {"a", "b"}
    assert {t.number: t.values for t in load(home).get_trials()} == first


def test_run_cache_makes_a_repeated_config_free(home, tiny_corpus, ray_local):
    run(tiny_space(tiny_corpus, study={"name": "one"}))
    summary = run(tiny_space(tiny_corpus, study={"name": "two"}))
    assert all(o.cached for o in summary.outcomes) and len(summary.outcomes) == 2
    one, two = load(home, "one"), load(home, "two")
    for t1, t2 in zip(one.get_trials(), two.get_trials()):
        assert t2.user_attrs["cache_hits"] == len(SIZES)
        assert all(s["cached"] for s in t2.user_attrs["sizes"])
        assert t2.values == t1.values


def test_tpe_adds_n_trials_beyond_the_warm_start(home, tiny_corpus, ray_local):
    space = tiny_space(
        tiny_corpus,
        study={"name": "tpe"},
        # startup proposals are independent: in a 9-point space TPE's model, seeded alike each
        # run, can propose the best configs again and again (repeats), which is another test's
        sampler={"type": "tpe", "seed": 0, "n_startup_trials": 20},
        parameters={"num_layers": {"type": "int", "low": 1, "high": 3}, "context_dim": [4, 8, 12]},
        warm_start={"configs": {"warm": {"num_layers": 2, "context_dim": 8}}},
    )
    summary = run(space, n_trials=3)
    trials = [t for t in load(home, "tpe").get_trials() if t.user_attrs.get("repeat_of") is None]  # repeats are answered, not run
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({(t.params["num_layers"], t.params["context_dim"]) for t in trials}) == 4  # four distinct configs
    assert [t.user_attrs["config_name"] for t in trials].count("warm") == 1
    assert len([o for o in summary.outcomes if o.state != "REPEAT"]) == 4
    run(space, n_trials=2)
    trials = [t for t in load(home, "tpe").get_trials() if t.user_attrs.get("repeat_of") is None]
    assert len(trials) == 6  # the warm start is not queued again
    assert [t.user_attrs["config_name"] for t in trials].count("warm") == 1


def test_a_search_runs_trials_only_once_started_and_stops_when_the_space_is_exhausted(home, tiny_corpus, ray_local, monkeypatch):
    """2 CPUs, max_concurrent 4: at every event the study's RUNNING trials are exactly those
    whose workers reported; a 2-point space with --n-trials 5 ends "space exhausted"."""
    import archsearch.search.bridge as bridge_mod

    monkeypatch.setattr(bridge_mod, "MAX_REPEATS", 5)
    seen = []
    on_result = bridge_mod.StudyBridge.on_result

    def checked(self, ray_id, result):
        out = on_result(self, ray_id, result)
        running = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        started = {lt.number for lt in self.live.values() if lt.running}
        seen.append((running, started))
        return out

    monkeypatch.setattr(bridge_mod.StudyBridge, "on_result", checked)
    space = tiny_space(tiny_corpus, study={"name": "small"}, sampler={"type": "random", "seed": 0}, max_concurrent=4,
                       parameters={"num_layers": {"type": "int", "low": 1, "high": 2}, "context_dim": [8]})  # fmt: skip
    summary = run(space, n_trials=5)
    assert seen and all(running == started for running, started in seen), seen
    assert summary.exhausted and "2 distinct configs evaluated" in summary.exhausted and summary.repeats >= 5
    trials = load(home, "small").get_trials()
    assert sum(1 for t in trials if t.user_attrs.get("repeat_of") is None) == 2
    assert all(t.state != TrialState.RUNNING and t.state != TrialState.WAITING for t in trials)


def test_early_stopped_trial_is_pruned_never_complete(home, tiny_corpus, ray_local):
    # alpha is never below -10: the threshold pruner stops every trial at its first report
    space = tiny_space(tiny_corpus, early_stopping={"pruner": "threshold", "upper": -10.0})
    run(space)
    trials = load(home).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    for t in trials:
        # Optuna keeps a pruned trial's last intermediate value (the partial fit) as its value
        assert t.values == [t.intermediate_values[SIZES[0] + SIZES[1]]]
        assert t.user_attrs["sizes_done"] == 2 < len(SIZES)  # stopped after its second size
        assert "pruner stopped it" in t.user_attrs["pruned_reason"]
        assert list(t.intermediate_values) == [SIZES[0] + SIZES[1]]


def test_raising_trial_fails_with_its_cause_and_the_study_goes_on(home, tiny_corpus, ray_local):
    configs = {
        "good": {"num_layers": 1, "context_dim": 8},
        "nan": {"num_layers": 1, "context_dim": 8, "model.init_std": 1e30},  # overflows to NaN
    }
    summary = run(tiny_space(tiny_corpus, sampler={"type": "grid", "configs": configs}, max_failures=1))
    states = {}
    for t in load(home).get_trials():
        states.setdefault(t.user_attrs["config_name"], []).append(t.state)
        if t.state == TrialState.FAIL:
            assert "NonFiniteLoss" in t.user_attrs["error"] and "NaN" in t.user_attrs["error"]
            assert t.values is None
    assert states == {"good": [TrialState.COMPLETE], "nan": [TrialState.FAIL, TrialState.FAIL]}  # one retry
    assert [o.name for o in summary.failed] == ["nan", "nan"]
    assert not any(math.isnan(s["val_ppl"]) for t in load(home).get_trials() for s in t.user_attrs.get("sizes", []))


def test_pareto_search_with_two_objectives(home, tiny_corpus, ray_local):
    space = tiny_space(
        tiny_corpus,
        study={"name": "pareto"},
        objective=[{"name": "ppl_at", "target_tokens": 1e6}, "phase1_params"],
        sampler={"type": "nsga2", "seed": 0, "population_size": 4},
        parameters={"num_layers": {"type": "int", "low": 1, "high": 3}, "context_dim": [4, 8, 16]},
    )
    run(space, n_trials=4)
    study = load(home, "pareto")
    trials = [t for t in study.get_trials() if t.user_attrs.get("repeat_of") is None]  # repeats are answered, not run
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert study.metric_names == ["ppl_at_1M", "phase1_params"]
    for t in trials:
        assert t.values == [pytest.approx(t.user_attrs["ppl_at_target"]), t.user_attrs["phase1_params"]]
        assert t.intermediate_values == {}  # Optuna cannot prune (or report for) several objectives
    assert study.best_trials  # a Pareto set exists


def test_search_report_has_history_and_importances(home, tiny_corpus, ray_local, tmp_path):
    from helpers import cli

    space = tiny_space(tiny_corpus, study={"name": "tpe2"}, sampler={"type": "tpe", "seed": 1, "n_startup_trials": 2},
                       parameters={"num_layers": {"type": "int", "low": 1, "high": 3}, "context_dim": [4, 8, 16]})  # fmt: skip
    run(space, n_trials=4)
    r = cli("report", "--storage", f"sqlite:///{home / 'archsearch.db'}", "--study", "tpe2", "--out", str(tmp_path / "rep"),
            "--top", "3", env={"ARCHSEARCH_HOME": str(home)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "history.png").exists() and (tmp_path / "rep" / "importances.png").exists()
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "the 3 best configs of 4 by alpha, lowest first (feasible ones first)" in md


def test_a_trial_whose_dashboard_plot_fails_still_completes(home, tiny_corpus, ray_local):
    import optuna_dashboard

    def broken(trial, name, records, fit, folder):
        raise ImportError("No module named 'matplotlib'")

    space = tiny_space(tiny_corpus, sampler={"type": "grid", "configs": {"a": {"num_layers": 1, "context_dim": 8}}})
    summary = run(space, artifacts=broken)
    assert [o.state for o in summary.outcomes] == ["COMPLETE"]
    (trial,) = load(home).get_trials()
    assert trial.state == TrialState.COMPLETE and "matplotlib" in trial.user_attrs["artifact_error"]
    assert trial.values == [pytest.approx(trial.user_attrs["alpha"])]
    study = load(home)  # its note is written all the same, without the plot
    note = optuna_dashboard.get_note(optuna.Trial(study, trial._trial_id))
    assert "## a" in note and "Val PPL" in note and "/artifacts/" not in note


class _Cluster:
    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


@pytest.mark.parametrize("gpus, cpus, max_concurrent, resources, slots", [
    (1, 1, 4, {"GPU": 2, "CPU": 32}, 2),      # one trial per GPU
    (0.5, 1, 4, {"GPU": 2, "CPU": 32}, 4),    # two per GPU
    (0.5, 1, 3, {"GPU": 2, "CPU": 32}, 3),    # max_concurrent caps it
    (0, 1, 4, {"CPU": 2}, 2),                 # CPU trials: one per CPU asked
    (0, 2, 4, {"CPU": 3}, 1),
])  # fmt: skip
def test_workers_started_at_once_match_what_the_cluster_runs_at_once(tiny_corpus, gpus, cpus, max_concurrent, resources, slots):
    from archsearch.search.runner import _slots

    space = parse_space(tiny_space(tiny_corpus, max_concurrent=max_concurrent))
    assert _slots(_Cluster(**resources), space, gpus, cpus) == slots


def test_a_full_disk_in_tunes_own_state_write_ends_the_run_as_disk_full(home, tiny_corpus, ray_local, monkeypatch):
    """Tune writes its experiment state from the driver and re-raises a failed write out of
    tuner.fit: a full disk there ends the run as the study's or the run cache's full disk does
    (summary.disk_full, no traceback), and anything else still propagates."""
    import errno

    from archsearch.search import runner

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "_fit", full)
    summary = run(tiny_space(tiny_corpus))
    assert summary.disk_full and "the disk is full" in summary.disk_full and "No space left on device" in summary.disk_full

    def other(*a, **k):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(runner, "_fit", other)
    with pytest.raises(PermissionError):
        run(tiny_space(tiny_corpus))
