"""Study bookkeeping: stale trials, queueing each config once, the study signature."""

from __future__ import annotations

import json
import os
import socket
import time

import optuna
import pytest
from helpers import tiny_space
from optuna.trial import TrialState

from archsearch.errors import ConfigError
from archsearch.search import study as st
from archsearch.space import parse_space


@pytest.fixture
def grid(tiny_corpus):
    return parse_space(tiny_space(tiny_corpus))


def new_study(tmp_path, space):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    return st.create_or_load(space, storage, "s")


def test_reconcile_queues_each_config_once(tmp_path, grid):
    study = new_study(tmp_path, grid)
    first = st.reconcile(study, grid)
    second = st.reconcile(study, grid)
    assert first.queued == ["a", "b"] and second.queued == [] and sorted(second.pending) == ["a", "b"]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs["config_name"] for t in waiting] == ["a", "b"]


def test_dead_drivers_running_trial_is_failed_and_its_config_requeued(tmp_path, grid):
    study = new_study(tmp_path, grid)
    st.reconcile(study, grid)
    trial = st.pop_waiting(study)
    # a driver process that no longer exists on this host
    dead = {"host": socket.gethostname(), "pid": 2**22 + 12345, "start": "1"}
    study._storage.set_trial_system_attr(trial._trial_id, st.A_OWNER, dead)
    rec = st.reconcile(study, grid)
    assert rec.failed_stale == [trial.number]
    frozen = study._storage.get_trial(trial._trial_id)
    assert frozen.state == TrialState.FAIL and "stale" in frozen.user_attrs["fail_reason"]
    name = trial.user_attrs["config_name"]
    assert name in rec.queued
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2


def test_live_trials_are_left_alone(tmp_path, grid):
    study = new_study(tmp_path, grid)
    st.reconcile(study, grid)
    mine = st.pop_waiting(study)
    study._storage.set_trial_system_attr(mine._trial_id, st.A_OWNER, st.owner_record())
    other = st.pop_waiting(study)  # another host, fresh heartbeat
    study._storage.set_trial_system_attr(other._trial_id, st.A_OWNER, {"host": "elsewhere", "pid": 1})
    study._storage.set_trial_system_attr(other._trial_id, st.A_HEARTBEAT, time.time())
    assert st.reconcile(study, grid).failed_stale == []
    # the other host stops beating: stale after the grace period
    study._storage.set_trial_system_attr(other._trial_id, st.A_HEARTBEAT, time.time() - st.GRACE_S - 1)
    assert st.reconcile(study, grid).failed_stale == [other.number]


def test_pop_waiting_is_exclusive(tmp_path, grid):
    study = new_study(tmp_path, grid)
    st.reconcile(study, grid)
    again = optuna.load_study(study_name="s", storage=study._storage)
    a, b = st.pop_waiting(study), st.pop_waiting(again)
    assert a.number != b.number and st.pop_waiting(study) is None


def test_pop_waiting_takes_the_costliest_first_and_keeps_queue_order_on_ties(tmp_path, tiny_corpus):
    configs = {"small": {"num_layers": 1}, "big": {"num_layers": 3}, "mid": {"num_layers": 2}, "mid2": {"num_layers": 2, "num_input_tokens": 2}}
    space = parse_space(tiny_space(tiny_corpus, sampler={"type": "grid", "configs": configs}))
    study = new_study(tmp_path, space)
    st.reconcile(study, space)

    def popped(cost):
        out = []
        while (t := st.pop_waiting(study, cost=cost)) is not None:
            out.append(t.user_attrs["config_name"])
        return out

    assert popped(lambda p: p["num_layers"]) == ["big", "mid", "mid2", "small"]
    # without a cost (or with one that cannot read the config): the queue's order
    for retry in ("small", "big", "mid"):
        st.enqueue(study, retry, dict(configs[retry], context_dim=8, num_input_tokens=1))
    assert popped(lambda p: p["no_such_key"]) == ["small", "big", "mid"]
    for retry in ("mid", "big"):
        st.enqueue(study, retry, dict(configs[retry], context_dim=8, num_input_tokens=1))
    assert popped(None) == ["mid", "big"]


def test_a_study_refuses_a_space_with_other_data(tmp_path, tiny_corpus, grid):
    new_study(tmp_path, grid)
    other = tiny_space(tiny_corpus)
    other["data"]["sizes"] = {"tokens": [400, 900]}
    with pytest.raises(ConfigError, match="data"):
        new_study(tmp_path, parse_space(other))


def test_owner_alive_checks_pid_and_start_time():
    me = st.owner_record()
    assert st.owner_alive(me, None, time.time())
    assert not st.owner_alive(dict(me, start="0"), None, time.time())  # same pid, another process
    assert not st.owner_alive({"host": "elsewhere", "pid": os.getpid()}, None, time.time())


def test_the_signature_is_kept_out_of_the_user_attributes(tmp_path, tiny_corpus, grid):
    study = new_study(tmp_path, grid)
    assert not any("signature" in k for k in study.user_attrs)  # the dashboard's study attributes stay readable
    assert st.stored_signature(study)["hash"] == st.signature_hash(st.signature(grid))
    other = tiny_space(tiny_corpus)
    other["seeds"] = [1, 2]
    with pytest.raises(ConfigError, match="seeds"):
        new_study(tmp_path, parse_space(other))


def test_a_study_with_the_signature_among_its_user_attributes_is_still_checked(tmp_path, tiny_corpus, grid):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    old = optuna.create_study(study_name="s", storage=storage)  # as archsearch wrote studies before
    sig = st.signature(grid)
    old.set_user_attr(st.A_SIGNATURE, {"hash": st.signature_hash(sig), "value": sig})
    assert st.create_or_load(grid, storage, "s").study_name == "s"
    other = tiny_space(tiny_corpus)
    other["data"]["sizes"] = {"tokens": [400, 900]}
    with pytest.raises(ConfigError, match="data"):
        st.create_or_load(parse_space(other), storage, "s")


def test_a_changed_space_names_each_changed_field_with_both_values(tmp_path, tiny_corpus, grid):
    """A second run into the study with a changed space: the error names the fields as the
    space file writes them (not "other base than this space file"), with both values."""
    study = new_study(tmp_path, grid)
    other = tiny_space(tiny_corpus)
    other["phase1"] = {**other.get("phase1", {}), "lr": 0.0123}
    other["seeds"] = [7]
    with pytest.raises(ConfigError) as e:
        st.create_or_load(parse_space(other), study._storage, "s")
    text = str(e.value)
    assert f"phase1.lr: {st.signature(grid)['base']['phase1']['lr']} in the study, 0.0123 here" in text
    assert f"seeds: {json.dumps(grid.seeds)} in the study, [7] here" in text
    assert "base" not in text and "Use another --study name" in text
