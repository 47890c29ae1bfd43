"""What the fault and signal tests share: a grid study slow enough that a fault lands
mid-trial, a driver launched as a user would, and the checks after a rerun (every config
completed exactly once, nothing left RUNNING or WAITING)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter

import optuna
from helpers import ROOT, cli, read_trials, tiny_space
from optuna.trial import TrialState

from archsearch.search import storage as stg

CONFIGS = {f"c{i}": {"num_layers": 1 + i % 2, "context_dim": 8 * (1 + i // 2)} for i in range(4)}


def grid_space(corpus: dict, **sections) -> dict:
    return tiny_space(corpus, sampler={"type": "grid", "configs": CONFIGS}, **sections)


def slow_space(corpus: dict) -> dict:
    """Enough phase-2 epochs per size that a fault or a signal lands mid-trial."""
    return grid_space(corpus, max_concurrent=1, phase2={"batch_size": 16, "max_epochs": 40, "patience": 40})


def launch(space, home, *args) -> subprocess.Popen:
    """`archsearch run` in its own session (a signal to it reaches the driver alone)."""
    env = dict(os.environ, ARCHSEARCH_HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "archsearch.cli", "run", str(space), "--quiet", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def wait_mid_trial(db, proc, timeout=240) -> optuna.trial.FrozenTrial:
    """The first trial RUNNING with at least one size done (read-only, while the run writes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.3)
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stdout.read()} {proc.stderr.read()}")
        try:
            trials = read_trials(db, "tiny")
        except Exception:
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("sizes_done", 0) >= 1]
        if running:
            return running[0]
    raise AssertionError("no trial reached mid-way")


def check_exactly_once(storage: str, configs=CONFIGS) -> list:
    trials = optuna.load_study(study_name="tiny", storage=stg.open_storage(storage, create=False)).get_trials()
    complete = Counter(t.user_attrs["config_name"] for t in trials if t.state == TrialState.COMPLETE)
    assert complete == Counter(list(configs)), complete  # zero lost, zero duplicates
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return trials


def rerun_completes(space, home, *args) -> subprocess.CompletedProcess:
    r = cli("run", str(space), "--quiet", *args, env={"ARCHSEARCH_HOME": str(home)}, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return r
