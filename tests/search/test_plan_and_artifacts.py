"""Around the trials of a run: one plan builder for `archsearch trial` and `archsearch run`,
and the dashboard artifacts reaching the study bridge through a callback (real Ray, real
SQLite storage)."""

from __future__ import annotations

import csv

import optuna
import pytest
from helpers import tiny_space, write_space
from optuna.trial import TrialState

from archsearch.errors import ConfigError
from archsearch.plan import chosen_config
from archsearch.space import parse_space
from archsearch.trial import TrialPlan

CONFIGS = {"a": {"num_layers": 1, "context_dim": 8, "num_input_tokens": 1}}


@pytest.fixture(scope="module")
def recorded_run(tiny_corpus, tmp_path_factory):
    """One grid run with a recording artifacts callback; the plans the bridge handed to Ray."""
    import ray

    from archsearch.search.bridge import StudyBridge
    from archsearch.search.runner import run_search

    home = tmp_path_factory.mktemp("home")
    space = tiny_space(tiny_corpus, sampler={"type": "grid", "configs": CONFIGS}, seeds=[3, 4])
    calls, plans = [], []

    def artifacts(trial, name, result):
        calls.append((trial.number, name, result))

    real_suggest = StudyBridge.suggest

    def suggest(self, ray_id):
        out = real_suggest(self, ray_id)
        if isinstance(out, dict):
            plans.append(out["plan"])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARCHSEARCH_HOME", str(home))
        mp.setattr(StudyBridge, "suggest", suggest)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            summary = run_search(parse_space(space), view_mode="quiet", artifacts=artifacts)
        finally:
            ray.shutdown()
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'archsearch.db'}")
    return {"home": home, "space": space, "summary": summary, "study": study, "calls": calls, "plans": plans}


def test_cli_trial_and_run_build_the_same_plan_for_the_same_config(recorded_run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import archsearch.trial
    from archsearch.cli import app

    home, space = recorded_run["home"], recorded_run["space"]
    (handed_to_ray,) = recorded_run["plans"]
    monkeypatch.setenv("ARCHSEARCH_HOME", str(home))
    seen = []

    class Planned(Exception):
        """The plan is all this test needs: stop before training."""

    def run_trial(plan, **kw):
        seen.append(plan)
        raise Planned

    monkeypatch.setattr(archsearch.trial, "run_trial", run_trial)
    path = write_space(tmp_path / "space.yaml", space)
    r = CliRunner().invoke(app, ["trial", str(path), "--config", "a", "--device", "cpu", "--quiet"])
    assert isinstance(r.exception, Planned), r.output
    (cli_plan,) = seen
    assert cli_plan == TrialPlan(**handed_to_ray)
    # and it is the space's trial, not two equally empty plans
    assert cli_plan.name == "a" and cli_plan.params == CONFIGS["a"] and cli_plan.run_config.model.context_dim == 8
    assert cli_plan.sizes == [400, 800, 1600] and cli_plan.size_unit == "tokens" and cli_plan.seeds == [3, 4]
    assert cli_plan.objectives == [{"name": "alpha", "direction": "minimize", "target_tokens": None}]
    assert cli_plan.cache_dir == str(home / "runs") and cli_plan.device == "cpu"


def test_the_bridge_gets_the_artifacts_through_the_callback(recorded_run):
    study = recorded_run["study"]
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE
    ((number, name, result),) = recorded_run["calls"]  # once per finished trial, with its result
    assert (number, name) == (trial.number, "a")
    assert [s["val_ppl"] for s in result["sizes"]] == [s["val_ppl"] for s in trial.user_attrs["sizes"]]
    assert result["fit"]["alpha"] == pytest.approx(trial.values[0])
    # the callback replaced the default one: the bridge itself stored no plot or table
    assert optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage) == []
    assert not (recorded_run["home"] / "artifacts").exists()


def test_the_trial_files_are_a_plot_and_a_flat_table(tmp_path):
    """Typed per-size records (SizeRecord.to_dict()) give the table the flat records gave."""
    from archsearch.report.artifacts import write_trial_files

    sizes = [{"train_tokens": t, "val_ppl": p, "val_acc": 0.1, "params": {"phase1": 10, "total": 30}, "metrics": {"val_er": 0.9},
              "phase_seconds": {"phase2": 1.5}, "seeds": [1, 2], "capped": ["max_epochs"], "cached": False}
             for t, p in ((400, 90.0), (800, 70.0), (1600, 55.0))]  # fmt: skip
    fit = {"alpha": -0.35, "A": 750.0, "alpha_low": -0.5, "alpha_high": -0.2}
    files = write_trial_files(tmp_path, 7, "a", {"sizes": sizes, "fit": fit})
    assert [(p.name, m) for p, m in files] == [("trial_7_a_scaling.png", "image/png"), ("trial_7_a_sizes.csv", "text/csv")]
    assert files[0][0].read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(files[1][0].open()))
    # the columns older studies' tables had (phase1_params, val_er, phase2_seconds), not nested ones
    assert list(rows[0]) == ["train_tokens", "val_ppl", "val_acc", "cached", "phase1_params", "total_params", "phase2_seconds",
                             "val_er", "capped"]  # fmt: skip
    assert [float(r["val_ppl"]) for r in rows] == [90.0, 70.0, 55.0] and rows[2]["val_er"] == "0.9" and rows[0]["capped"] == "max_epochs"


def test_trial_config_is_the_named_one(tiny_corpus):
    sp = parse_space(tiny_space(tiny_corpus))
    assert chosen_config(sp) == ("a", {"num_layers": 1, "context_dim": 8, "num_input_tokens": 1})
    assert chosen_config(sp, "b") == ("b", {"num_layers": 2, "context_dim": 8, "num_input_tokens": 2})
    with pytest.raises(ConfigError, match="--config 'c': the space has a, b"):
        chosen_config(sp, "c")
