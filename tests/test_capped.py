"""Runs that hit a training cap: the space's retry rule trains the size again with raised caps."""

from __future__ import annotations

import dataclasses

from helpers import cli_trial_plan, tiny_space, write_space

from archsearch.space import parse_space
from archsearch.trial import TrialPlan, retry_settings, run_trial


def test_retry_settings_raise_only_the_caps_that_were_hit():
    retry = {"phase1.max_iterations": 80, "phase2.max_epochs": 20}
    assert retry_settings(retry, {"max_epochs"}) == {"phase2.max_epochs": 20}
    assert retry_settings(retry, {"phase1_max_iterations", "max_epochs"}) == retry
    assert retry_settings({"phase2.max_epochs": 20}, {"phase1_max_iterations"}) == {}
    assert retry_settings(retry, set()) == {}


def test_a_capped_size_is_trained_again_with_the_raised_caps(tiny_corpus, tmp_path, monkeypatch):
    """The engine's own cap detection is another module's (tested there); here a run is
    called capped when its phase 2 had only the space's 2 epochs, as a real one would be
    when its best epoch is the last."""
    import archsearch.cvfp.run as engine
    from archsearch.plan import prepare_space_data

    real, calls = engine.train_run, []

    def train_run(cfg, *args, **kwargs):
        out = real(cfg, *args, **kwargs)
        calls.append(cfg.phase2.max_epochs)
        flags = ["max_epochs"] if cfg.phase2.max_epochs <= 2 else []
        if isinstance(out, dict):
            out["capped"] = flags
        else:
            out = dataclasses.replace(out, capped=flags)
        return out

    monkeypatch.setattr(engine, "train_run", train_run)
    space = parse_space(tiny_space(tiny_corpus, capped={"retry": {"phase2.max_epochs": 3}}, data=dict(tiny_space(tiny_corpus)["data"], sizes={"tokens": [400, 800]})))
    data = prepare_space_data(space)
    params = {"num_layers": 1, "context_dim": 8, "num_input_tokens": 1}
    plan = TrialPlan(params=params, config=space.run_config(params).to_dict(), sizes=[400, 800], size_unit="tokens", seeds=[42],
                     objectives=[o.__dict__ for o in space.objectives], data_path=str(data.path), cache_dir=str(tmp_path / "cache"),
                     extra={"capped_retry": space.capped_retry})  # fmt: skip
    result = run_trial(plan)
    assert calls == [2, 3, 2, 3]  # each size: the capped run, then again with max_epochs 3
    for rec in result["sizes"]:
        assert rec["retried"] == {"phase2.max_epochs": 3} and rec["capped"] == []
    calls.clear()
    again = run_trial(plan)  # both runs of each size come from the run cache
    assert calls == [] and [r["val_ppl"] for r in again["sizes"]] == [r["val_ppl"] for r in result["sizes"]]


def test_archsearch_trial_plans_the_raised_caps_as_a_run_does(tiny_corpus, tmp_path, monkeypatch):
    """The plan builder (archsearch.plan.trial_plan) carries the space's capped_retry, so
    ``archsearch trial`` retrains a capped size as ``archsearch run`` does."""
    from archsearch.plan import trial_plan

    monkeypatch.setenv("ARCHSEARCH_HOME", str(tmp_path / "home"))
    retry = tiny_space(tiny_corpus, capped={"retry": {"phase2.max_epochs": 3}})
    planned = cli_trial_plan(monkeypatch, write_space(tmp_path / "retry.yaml", retry))
    assert planned.extra == {"capped_retry": {"phase2.max_epochs": 3}}
    assert trial_plan(parse_space(retry), {"num_layers": 1}, name="x", data_path="-").extra == planned.extra
    assert trial_plan(parse_space(tiny_space(tiny_corpus)), {"num_layers": 1}, name="x", data_path="-").extra == {}
