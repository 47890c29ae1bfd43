"""Ctrl-C stops cleanly and resumes; a SIGKILLed worker fails its trial and the study goes on."""

from __future__ import annotations

import os
import signal

import optuna
import pytest
from fault_runs import CONFIGS, check_exactly_once, launch, rerun_completes, slow_space, wait_mid_trial
from helpers import write_space
from optuna.trial import TrialState


def finish_and_check(space, home) -> list:
    rerun_completes(space, home)
    return check_exactly_once(f"sqlite:///{home / 'archsearch.db'}")


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", slow_space(tiny_corpus))
    proc = launch(space, home)
    mid = wait_mid_trial(home / "archsearch.db", proc)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, out + err
    assert "run the same command again to resume" in err
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'archsearch.db'}").get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # consistent: nothing left RUNNING
    interrupted = trials[mid.number]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["error_kind"] == "interrupted"
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert mid.user_attrs["config_name"] in [t.user_attrs["config_name"] for t in waiting]  # queued first for the next run
    finish_and_check(space, home)


@pytest.mark.slow
def test_sigkill_of_a_worker_fails_its_trial_and_a_rerun_completes(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", slow_space(tiny_corpus))
    proc = launch(space, home)
    mid = wait_mid_trial(home / "archsearch.db", proc)
    os.kill(mid.user_attrs["worker_pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, out + err  # the study went on; one trial failed
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'archsearch.db'}").get_trials()
    killed = trials[mid.number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["error_kind"] == "worker_died"
    others = [t for t in trials if t.number != mid.number]
    assert all(t.state == TrialState.COMPLETE for t in others) and len(others) == len(CONFIGS) - 1
    before = {t.number: t.values for t in others}
    trials = finish_and_check(space, home)
    assert {t.number: t.values for t in trials if t.number in before} == before  # completed trials unchanged
