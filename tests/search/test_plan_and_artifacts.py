"""Around the trials of a run: one plan builder for `archsearch trial` and `archsearch run`,
and the dashboard artifacts reaching the study bridge through a callback (real Ray, real
SQLite storage)."""

from __future__ import annotations

import csv
import math

import optuna
import pytest
from helpers import cli_trial_plan, tiny_space, write_space
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

    def artifacts(trial, name, records, fit, folder):
        calls.append((trial.number, name, records, fit, folder.is_dir()))

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
    home, space = recorded_run["home"], recorded_run["space"]
    (handed_to_ray,) = recorded_run["plans"]
    monkeypatch.setenv("ARCHSEARCH_HOME", str(home))
    cli_plan = cli_trial_plan(monkeypatch, write_space(tmp_path / "space.yaml", space))
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
    ((number, name, records, fit, had_folder),) = recorded_run["calls"]  # once per finished trial, with its sizes and fit
    assert (number, name, had_folder) == (trial.number, "a", True)
    assert [r.val_ppl for r in records] == [s["val_ppl"] for s in trial.user_attrs["sizes"]]
    assert fit["alpha"] == pytest.approx(trial.values[0])
    # the callback replaced the default one: the bridge itself stored no plot or table (its
    # temporary folder for the callback's files is gone), and the note links no plot
    assert optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage) == []
    art = recorded_run["home"] / "artifacts"
    assert not art.exists() or not any(art.iterdir())
    import optuna_dashboard

    note = optuna_dashboard.get_note(optuna.Trial(study, trial._trial_id))
    assert note.startswith("## a\n") and "/artifacts/" not in note


def test_the_trial_files_are_a_plot_and_a_flat_table(tmp_path):
    """Typed per-size records and the flat dicts of older studies give the same table: PPL
    first, the nested numbers as columns of their own (phase1_params, val_er, phase2_seconds)."""
    from archsearch.report.artifacts import write_trial_files
    from archsearch.result import SizeRecord

    sizes = [{"size": t, "size_unit": "tokens", "train_tokens": t, "val_tokens": 300, "val_loss": math.log(p), "val_loss_se": 0.01,
              "val_ppl": p, "val_acc": 0.1, "params": {"phase1": 10, "total": 30}, "metrics": {"val_er": 0.9},
              "phase_seconds": {"phase2": 1.5}, "seconds": 2.0, "device": "cpu", "precision": "fp32", "seeds": [1, 2],
              "capped": ["max_epochs"] if t == 400 else [], "cached": False}
             for t, p in ((400, 90.0), (800, 70.0), (1600, 55.0))]  # fmt: skip
    fit = {"alpha": -0.35, "A": 750.0, "alpha_low": -0.5, "alpha_high": -0.2}
    files = write_trial_files(tmp_path, 7, "a", [SizeRecord.from_dict(s) for s in sizes], fit)
    assert [(f.path.name, f.mimetype, f.url) for f in files] == [("trial_7_a_scaling.png", "image/png", None),
                                                                ("trial_7_a_sizes.csv", "text/csv", None)]  # fmt: skip
    assert files[0].path.read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(files[1].path.open()))
    assert list(rows[0])[:6] == ["size", "train_tokens", "val_ppl", "val_ppl_low", "val_ppl_high", "val_acc"]
    assert {"phase1_params", "total_params", "phase2_seconds", "val_er", "capped"} <= set(rows[0])
    assert [float(r["val_ppl"]) for r in rows] == [90.0, 70.0, 55.0] and rows[2]["val_er"] == "0.9"
    assert [r["capped"] for r in rows] == ["max_epochs", "", ""]
    flat = {k: v for k, v in sizes[0].items() if k not in ("params", "metrics", "phase_seconds")}
    flat.update(phase1_params=10, total_params=30, val_er=0.9, phase2_seconds=1.5)
    (tmp_path / "flat").mkdir()
    again = write_trial_files(tmp_path / "flat", 7, "a", [SizeRecord.from_dict(flat)], fit)
    (row,) = list(csv.DictReader(again[1].path.open()))
    assert row == rows[0]


def test_trial_config_is_the_named_one(tiny_corpus):
    sp = parse_space(tiny_space(tiny_corpus))
    assert chosen_config(sp) == ("a", {"num_layers": 1, "context_dim": 8, "num_input_tokens": 1})
    assert chosen_config(sp, "b") == ("b", {"num_layers": 2, "context_dim": 8, "num_input_tokens": 2})
    with pytest.raises(ConfigError, match="--config 'c': the space has a, b"):
        chosen_config(sp, "c")


def test_a_long_label_or_a_slash_in_a_config_name_stays_one_file_in_the_folder(tmp_path):
    """A search names a trial by its label, which grows with the searched parameters (here
    past the 255 bytes of a file name), and a user family's categorical may hold '/': the
    trial's plot and table are still written, inside the folder, and their names differ."""
    from archsearch.paths import file_part
    from archsearch.report.artifacts import write_trial_files
    from archsearch.result import SizeRecord

    rec = SizeRecord.from_dict({"size": 400, "size_unit": "tokens", "train_tokens": 400, "val_tokens": 300, "val_loss": 4.5,
                                "val_loss_se": 0.01, "val_ppl": 90.0, "val_acc": 0.1, "params": {"total": 30}, "seconds": 2.0,
                                "device": "cpu", "precision": "fp32", "seeds": [1]})  # fmt: skip
    long = ",".join(f"phase1.param_{i}=0.{i:020d}" for i in range(12))
    names = [long, long[:-1] + "9", "cell=../../escaped", "cell=/abs/x"]
    folder = tmp_path / "files"
    folder.mkdir()
    written = [f.path for n in names for f in write_trial_files(folder, 3, n, [rec], None)]
    assert len(set(written)) == 8 and all(p.parent == folder and p.is_file() and len(p.name) <= 255 for p in written)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(p.name for p in written)
    assert file_part("L=3,C=768,k=1") == "L=3,C=768,k=1" and file_part("baseline") == "baseline"  # the usual names as they are
