"""The bridge's bookkeeping on a real SQLite study, driven as Ray drives it (no Ray run):
pending trials are WAITING until their worker starts them, repeats are answered from the
study, the space's rules become Optuna constraints, cap flags reach the trial."""

from __future__ import annotations

import functools
import json
import math

import optuna
import pytest
from helpers import tiny_space
from optuna.trial import TrialState

from archsearch.plan import trial_plan
from archsearch.result import SizeRecord
from archsearch.search import study as st
from archsearch.search.bridge import StudyBridge, capped_text
from archsearch.search.distributions import TrialConstraints, make_sampler, suggest_all
from archsearch.space import parse_space

PARAMS = {"num_layers": {"type": "int", "low": 1, "high": 2}, "context_dim": [8]}


def search_space(tiny_corpus, **sections):
    sections.setdefault("sampler", {"type": "random", "seed": 0})
    return parse_space(tiny_space(tiny_corpus, parameters=PARAMS, **sections))


def bridge_for(tmp_path, space, n_new=2, name="s"):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = st.create_or_load(space, storage, name)
    st.reconcile(study, space)
    make_plan = functools.partial(trial_plan, space, data_path="-", use_cache=False)
    bridge = StudyBridge(study, space, make_plan, n_new, embed_dim=8)
    return study, bridge


def event(seq, name, payload=None, **extra):
    return {"archsearch_event": name, "seq": seq, "payload": json.dumps(payload or {}), **extra}


def test_a_handed_out_trial_is_waiting_until_its_worker_starts_it(tmp_path, tiny_corpus):
    space = search_space(tiny_corpus, warm_start={"configs": {"w": {"num_layers": 1, "context_dim": 8}}})
    study, bridge = bridge_for(tmp_path, space)
    try:
        queued = bridge.suggest("ray-1")  # the warm start
        sampled = bridge.suggest("ray-2")  # a new proposal
        for cfg in (queued, sampled):
            frozen = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, cfg["optuna_trial"]))
            assert frozen.state == TrialState.WAITING and frozen.system_attrs[st.A_RESERVED]
        assert not study.get_trials(states=(TrialState.RUNNING,))
        # another driver's queue skips them while this one lives
        other = optuna.load_study(study_name="s", storage=study._storage)
        assert st.pop_waiting(other) is None
        assert bridge.view is None and bridge.progress == (0, 3)  # the warm start and two new ones
        bridge.on_result("ray-1", event(1, "started"))
        running = study.get_trials(states=(TrialState.RUNNING,))
        assert [t.number for t in running] == [queued["optuna_trial"]] and running[0].datetime_start is not None
        # interrupted before its worker ran it: back in the queue, never RUNNING, no FAIL
        bridge.live["ray-2"].error = {"error": "interrupted", "kind": "interrupted"}
        bridge.on_complete("ray-2")
        assert study.get_trials(states=(TrialState.FAIL,)) == []
        assert st.pop_waiting(other).number == sampled["optuna_trial"]
    finally:
        bridge.close()


def test_a_dead_drivers_reservation_is_taken_by_the_next_run(tmp_path, tiny_corpus):
    space = search_space(tiny_corpus, warm_start={"configs": {"w": {"num_layers": 1, "context_dim": 8}}})
    study, bridge = bridge_for(tmp_path, space)
    bridge.close()
    cfg = bridge.suggest("ray-1")
    tid = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, cfg["optuna_trial"])
    study._storage.set_trial_system_attr(tid, st.A_RESERVED, {"host": "elsewhere", "pid": 1})
    study._storage.set_trial_system_attr(tid, st.A_HEARTBEAT, 0.0)  # no heartbeat for ages
    assert st.pop_waiting(study).number == cfg["optuna_trial"]


def record(size, ppl, capped=(), unit="tokens") -> SizeRecord:
    return SizeRecord(size=size, size_unit=unit, train_tokens=size, val_tokens=300, val_loss=math.log(ppl), val_loss_se=0.01,
                      val_ppl=ppl, val_acc=0.1, params={"phase1": 100, "phase2": 50, "total": 150}, seconds=0.1, device="cpu",
                      precision="fp32", seeds=[42], capped=list(capped), metrics={"val_er": 0.5})  # fmt: skip


def constraints(t) -> list[float]:
    """The constraint values Optuna's samplers see (Optuna 5: named; 4: a list)."""
    con = getattr(t, "constraints", None)
    return list(con.values()) if isinstance(con, dict) else list(t.system_attrs["constraints"])


def complete(bridge, ray_id, ppl, capped=()):
    """Drive one handed-out trial to COMPLETE as the trainable would report it."""
    lt = bridge.live[ray_id]
    sizes = [record(s, ppl * (s / 400) ** -0.3, list(capped) if i == 2 else []).to_dict() for i, s in enumerate((400, 800, 1600))]
    bridge.on_result(ray_id, event(1, "started"))
    for i, rec in enumerate(sizes):
        bridge.on_result(ray_id, event(2 + i, "size", {"record": rec, "partial": {"objectives": {}}}, step=sum(s["train_tokens"] for s in sizes[: i + 1]), objective=-0.3))
    bridge.on_result(ray_id, event(9, "final", {"complete": True, "sizes": sizes, "objectives": {bridge.space.objectives[0].label: ppl},
                                                "fit": {"alpha": -0.3}, "seconds": 1.0}))  # fmt: skip
    bridge.on_complete(ray_id)
    return lt.number


def test_repeats_are_told_the_original_value_not_counted_and_exhaust_the_space(tmp_path, tiny_corpus, monkeypatch):
    import archsearch.search.bridge as bridge_mod

    monkeypatch.setattr(bridge_mod, "MAX_REPEATS", 4)
    space = search_space(tiny_corpus, objective="final_ppl")
    study, bridge = bridge_for(tmp_path, space, n_new=10)
    try:
        first = bridge.suggest("ray-1")
        n1 = complete(bridge, "ray-1", 100.0)
        second = bridge.suggest("ray-2")
        assert second["plan"]["params"] != first["plan"]["params"]  # a repeat is never handed out
        n2 = complete(bridge, "ray-2", 120.0)
        assert bridge.suggest("ray-3") is bridge_mod.Searcher.FINISHED  # only two configs exist
        assert bridge.asked_new == 2  # repeats are not counted in the budget
        assert bridge.exhausted and "2 distinct configs evaluated" in bridge.exhausted
        repeats = [t for t in study.get_trials() if t.user_attrs.get("repeat_of") is not None]
        assert len(repeats) == bridge.repeats >= 4
        values = {n1: [100.0], n2: [120.0]}
        for t in repeats:
            assert t.state == TrialState.COMPLETE and t.values == values[t.user_attrs["repeat_of"]]
            assert t.user_attrs["config_name"] == study.trials[t.user_attrs["repeat_of"]].user_attrs["config_name"]
        assert [o.state for o in bridge.outcomes].count("REPEAT") == len(repeats)
    finally:
        bridge.close()
    # the report leaves repeats out of its rows and counts them
    from archsearch.report.sources import from_study

    configs, meta = from_study(study)
    assert sorted(c.number for c in configs) == [n1, n2] and meta["repeats"] == len(repeats)


def test_a_repeat_of_a_pruned_config_is_pruned_with_its_intermediate_values(tmp_path, tiny_corpus):
    space = search_space(tiny_corpus, objective="alpha")
    study, bridge = bridge_for(tmp_path, space)
    try:
        trial = st.ask_new(study)
        trial.suggest_int("num_layers", 1, 2)
        trial.suggest_categorical("context_dim", [8])
        trial.report(-0.2, 400)
        study.tell(trial, state=TrialState.PRUNED)
        again = st.ask_new(study)
        again.suggest_int("num_layers", 1, 2)  # the random sampler may propose anything: force the same config
        params = dict(again.params) | {"context_dim": 8}
        if params["num_layers"] != trial.params["num_layers"]:
            pytest.skip("the sampler proposed the other config")
        again.suggest_categorical("context_dim", [8])
        bridge._answer_repeat(again, params, study._storage.get_trial(trial._trial_id))
        frozen = study._storage.get_trial(again._trial_id)
        assert frozen.state == TrialState.PRUNED and frozen.intermediate_values == {400: -0.2}
        assert frozen.user_attrs["repeat_of"] == trial.number
    finally:
        bridge.close()


def test_admissibility_rule_makes_a_bad_config_infeasible_for_the_sampler(tmp_path, tiny_corpus):
    space = search_space(tiny_corpus, objective="alpha", sampler={"type": "tpe", "seed": 0}, admissible={"max_ppl_ratio": 1.5})
    if not hasattr(optuna.Trial, "set_constraint"):  # Optuna 4: through the sampler's constraints_func
        assert isinstance(make_sampler(space)._constraints_func, TrialConstraints)
    study, bridge = bridge_for(tmp_path, space)
    try:
        bridge.suggest("ray-1")
        good = complete(bridge, "ray-1", 100.0)
        bridge.suggest("ray-2")
        bad = complete(bridge, "ray-2", 400.0)  # PPL at the largest size 4x the best so far
    finally:
        bridge.close()
    t_good, t_bad = study.trials[good], study.trials[bad]
    assert t_good.user_attrs["constraint_values"] == {"admissible_ppl_ratio": pytest.approx(1.0 - 1.5)} and "infeasible" not in t_good.user_attrs
    assert t_bad.user_attrs["constraint_values"] == {"admissible_ppl_ratio": pytest.approx(4.0 - 1.5)}
    assert "max_ppl_ratio" in t_bad.user_attrs["infeasible"] and "4.00x the best" in t_bad.user_attrs["infeasible"]
    # what TPE learns: Optuna stored the constraint the sampler's constraints_func returned
    assert constraints(t_bad) == [pytest.approx(2.5)] and constraints(t_good) == [pytest.approx(-0.5)]
    from archsearch.report.sources import from_study

    configs, _ = from_study(study)
    assert [c.number for c in configs if c.infeasible] == [bad]


def test_capped_runs_are_flagged_on_the_trial_and_infeasible_when_the_space_says_so(tmp_path, tiny_corpus):
    space = search_space(tiny_corpus, objective="alpha", sampler={"type": "tpe", "seed": 0}, capped="infeasible")
    study, bridge = bridge_for(tmp_path, space)
    try:
        bridge.suggest("ray-1")
        capped = complete(bridge, "ray-1", 100.0, capped=["phase1_max_iterations", "max_epochs"])
        bridge.suggest("ray-2")
        clean = complete(bridge, "ray-2", 110.0)
    finally:
        bridge.close()
    t = study.trials[capped]
    assert t.user_attrs["capped"] == ["1,600 tokens: phase1_max_iterations, max_epochs"]
    assert t.user_attrs["constraint_values"] == {"capped": 1.0} and "capped: infeasible" in t.user_attrs["infeasible"]
    assert constraints(t) == [1.0]
    assert "capped" not in study.trials[clean].user_attrs and constraints(study.trials[clean]) == [0.0]
    assert capped_text([record(5, 10.0, ["max_epochs"], unit="samples")]) == ["5 samples: max_epochs"]
    # the trial's one dashboard note: its config, alpha with its interval, and the cap and infeasibility flags
    import optuna_dashboard

    note = optuna_dashboard.get_note(optuna.Trial(study, t._trial_id))
    assert note.startswith(f"## {t.user_attrs['config_name']}\n") and "**α = " in note
    assert "- ⚠ capped: 1,600 tokens: phase1_max_iterations, max_epochs" in note and "- ⚠ infeasible: capped: infeasible" in note
    assert "⚠" not in optuna_dashboard.get_note(optuna.Trial(study, study.trials[clean]._trial_id))


def test_the_live_view_shows_pending_running_capped_and_done_of_total(tiny_corpus, capsys, tmp_path):
    from archsearch.search.bridge import LiveTrial
    from archsearch.search.view import LiveView

    view = LiveView(3, "tokens", ["alpha"], mode="lines")
    trial = optuna.create_study().ask()
    lt = LiveTrial(trial, "a", {"num_layers": 1})
    view.progress = (0, 3)
    view.update("pending", lt)
    assert view.rows[lt.number]["state"] == "PENDING"
    view.update("start", lt)
    assert view.rows[lt.number]["state"] == "RUNNING"
    lt.records.append(record(400, 50.0, ["max_epochs"]))
    view.update("size", lt)
    view.progress = (1, 3)
    view.update("end", lt, state="COMPLETE", values=[-0.3])
    err = capsys.readouterr().err
    assert "pending, waiting for a worker" in err and "[capped: max_epochs]" in err and "[1/3 done]" in err
    assert "1/3 done" in view._table().title and "1 capped" in str(view._table().columns[4]._cells[0])


def test_a_repeat_of_a_running_trial_waits_and_gets_its_value(tmp_path, tiny_corpus):
    space = search_space(tiny_corpus, objective="final_ppl")
    study, bridge = bridge_for(tmp_path, space)
    try:
        cfg = bridge.suggest("ray-1")
        bridge.on_result("ray-1", event(1, "started"))
        proposal = st.ask_new(study)  # the sampler proposes the running config again
        study._storage.set_trial_system_attr(proposal._trial_id, "fixed_params", cfg["plan"]["params"])
        again = optuna.Trial(study, proposal._trial_id)
        suggest_all(again, bridge.dists)
        original = study._storage.get_trial(bridge.live["ray-1"].trial._trial_id)
        bridge._answer_repeat(again, dict(again.params), original)
        frozen = study._storage.get_trial(again._trial_id)
        assert frozen.state == TrialState.WAITING and frozen.user_attrs["repeat_of"] == cfg["optuna_trial"]
        assert st.pop_waiting(optuna.load_study(study_name="s", storage=study._storage)) is None  # reserved
        complete(bridge, "ray-1", 100.0)
        frozen = study._storage.get_trial(again._trial_id)
        assert frozen.state == TrialState.COMPLETE and frozen.values == [100.0]
        assert [o.state for o in bridge.outcomes] == ["COMPLETE", "REPEAT"]
    finally:
        bridge.close()


def test_proposals_are_named_by_their_parameters_as_grid_points_are(tmp_path, tiny_corpus, monkeypatch):
    """A sampler's proposal gets the readable name a Cartesian grid gives its points (the
    dashboard's list shows "Trial N · <name>"), a warm start keeps its own, an infeasible
    proposal is named the same way."""
    from archsearch.space import config_label

    grid = parse_space(tiny_space(tiny_corpus, sampler={"type": "grid"}, parameters=PARAMS))
    assert set(grid.configs) == {"L=1,C=8", "L=2,C=8"}
    assert config_label({"num_layers": 3, "phase1.lr": 0.001, "num_input_tokens": 2}) == "L=3,phase1.lr=0.001,k=2"
    space = search_space(tiny_corpus, warm_start={"configs": {"w": {"num_layers": 1, "context_dim": 8}}})
    study, bridge = bridge_for(tmp_path, space)
    try:
        queued, sampled = bridge.suggest("ray-1"), bridge.suggest("ray-2")
        names = {t.number: t.user_attrs["config_name"] for t in study.get_trials()}
        assert names[queued["optuna_trial"]] == "w"
        proposal = study.trials[sampled["optuna_trial"]]
        assert names[proposal.number] == config_label(proposal.params) in grid.configs
        assert bridge.live["ray-2"].name == names[proposal.number]
    finally:
        bridge.close()
    from archsearch.search import bridge as bridge_module

    monkeypatch.setattr(bridge_module, "MAX_INFEASIBLE", 3)  # three infeasible proposals, then it gives up
    tight = search_space(tiny_corpus, constraints={"max_phase1_params": 1})
    (tmp_path / "tight").mkdir()
    study, bridge = bridge_for(tmp_path / "tight", tight)
    try:
        with pytest.raises(Exception, match="constraints"):
            bridge.suggest("ray-1")
        pruned = study.get_trials(states=(TrialState.PRUNED,))
        assert len(pruned) == 3 and all(t.user_attrs["config_name"] == config_label(t.params) for t in pruned)
    finally:
        bridge.close()


def test_a_cross_family_proposal_differing_only_in_another_familys_field_is_a_repeat(tmp_path, tiny_corpus, monkeypatch):
    """In a search over ``family``, a gpt trial records CVFP's context_dim too (Optuna's
    distributions are fixed) though its run ignores it: two gpt proposals that differ only
    there are one config. The second is a repeat (answered from the study, left out of the
    report), not a second trial with the same numbers under another name; the proposal is
    named by the fields its run uses."""
    import archsearch.search.bridge as bridge_mod

    monkeypatch.setattr(bridge_mod, "MAX_REPEATS", 6)
    space = parse_space(tiny_space(tiny_corpus, sampler={"type": "random", "seed": 0}, objective="final_ppl",
                                   parameters={"family": ["cvfp", "gpt"], "num_layers": [1], "context_dim": [8, 16]}))  # fmt: skip
    study, bridge = bridge_for(tmp_path, space, n_new=10)
    try:
        done = []
        while (s := bridge.suggest(f"ray-{len(done)}")) not in (None, bridge_mod.Searcher.FINISHED):
            done.append((complete(bridge, f"ray-{len(done)}", 100.0 + len(done)), s["plan"]["params"]))
        families = [p["family"] for _, p in done]
        assert sorted(families) == ["cvfp", "cvfp", "gpt"]  # cvfp at C=8 and C=16, gpt once
        assert bridge.exhausted and "3 distinct configs evaluated" in bridge.exhausted
        names = {t.number: t.user_attrs["config_name"] for t in study.get_trials()}
        gpt = next(n for n, p in done if p["family"] == "gpt")
        assert names[gpt] == "family=gpt,L=1"  # no C: the gpt run does not use it
        repeats = [t for t in study.get_trials() if t.user_attrs.get("repeat_of") is not None]
        assert any(t.params["family"] == "gpt" and t.user_attrs["repeat_of"] == gpt for t in repeats)
    finally:
        bridge.close()
    from archsearch.report.sources import from_study

    configs, _ = from_study(study)
    assert sorted(c.name for c in configs) == sorted(names[n] for n, _ in done)  # each config once
