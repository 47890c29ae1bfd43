"""Ctrl-C stops cleanly and resumes; a SIGKILLed worker fails its trial and the study goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
from helpers import ROOT, cli, read_trials, tiny_space, write_space
from optuna.trial import TrialState

CONFIGS = {f"c{i}": {"num_layers": 1 + i % 2, "context_dim": 8 * (1 + i // 2)} for i in range(4)}


def slow_space(corpus: dict) -> dict:
    # enough phase-2 epochs per size that a signal lands mid-trial
    return tiny_space(corpus, sampler={"type": "grid", "configs": CONFIGS}, max_concurrent=1,
                      phase2={"batch_size": 16, "max_epochs": 40, "patience": 40})  # fmt: skip


def start(space, home) -> subprocess.Popen:
    env = dict(os.environ, ARCHSEARCH_HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "archsearch.cli", "run", str(space), "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def wait_mid_trial(home, proc, timeout=240) -> optuna.trial.FrozenTrial:
    db = home / "archsearch.db"
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.3)
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stdout.read()} {proc.stderr.read()}")
        if not db.exists():
            continue
        try:
            trials = read_trials(db, "tiny")
        except Exception:
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("sizes_done", 0) >= 1]
        if running:
            return running[0]
    raise AssertionError("no trial reached mid-way")


def finish_and_check(space, home) -> list:
    r = cli("run", str(space), "--quiet", env={"ARCHSEARCH_HOME": str(home)}, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'archsearch.db'}").get_trials()
    complete = Counter(t.user_attrs["config_name"] for t in trials if t.state == TrialState.COMPLETE)
    assert complete == Counter(list(CONFIGS)), complete  # zero missing, zero duplicates
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return trials


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", slow_space(tiny_corpus))
    proc = start(space, home)
    mid = wait_mid_trial(home, proc)
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
    proc = start(space, home)
    mid = wait_mid_trial(home, proc)
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
