"""archsearch run / dashboard / studies as subprocesses: dry run, kill and resume, serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from helpers import ROOT, cli, read_trials, tiny_space, write_space
from optuna.trial import TrialState


def test_dry_run_lists_trials_and_writes_nothing(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    r = cli("run", str(space), "--dry-run", "--json", str(tmp_path / "d.json"), env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "d.json").read_text())
    assert [t["name"] for t in d["to_run"]] == ["a", "b"] and d["exists"] is False
    assert "would be created" in r.stdout and "runs: 6" in r.stdout
    assert not home.exists()


def test_grid_with_n_trials_is_a_usage_error(tmp_path, tiny_corpus):
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    r = cli("run", str(space), "--n-trials", "3", env={"ARCHSEARCH_HOME": str(tmp_path / "home")})
    assert r.returncode == 2 and "--n-trials" in r.stderr
    assert not (tmp_path / "home").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_study_on_localhost(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(study_name="served", storage=url)
    study.enqueue_trial({"x": 1.0})
    study.optimize(lambda t: t.suggest_float("x", 0, 2) ** 2, n_trials=2)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "archsearch.cli", "dashboard", "--storage", url, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    try:
        body = None
        for _ in range(100):
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read())
                break
            except OSError:
                time.sleep(0.2)
        assert body is not None, "the dashboard never answered"
        assert [s["study_name"] for s in body["study_summaries"]] == ["served"]
        # it listens on 127.0.0.1 only
        out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout if _has("ss") else ""
        if out:
            line = next(ln for ln in out.splitlines() if f":{port} " in ln)
            assert "127.0.0.1:" in line
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _has(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


def test_studies_lists_counts_and_best(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(study_name="listed", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 2) ** 2, n_trials=3)
    r = cli("studies", "--storage", url, "--json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "s.json").read_text())
    assert rows[0]["study"] == "listed" and rows[0]["trials"] == 3 and rows[0]["COMPLETE"] == 3
    assert rows[0]["best"][0]["values"] == [study.best_value]
    r = cli("studies", "--storage", f"sqlite:///{tmp_path / 'missing.db'}")
    assert r.returncode == 2 and "no such study storage" in r.stderr
    assert not (tmp_path / "missing.db").exists()


def test_studies_lists_a_study_whose_every_complete_trial_is_infeasible(tmp_path):
    """``capped: infeasible`` on a study whose every run hit a cap: Optuna has no best trial
    (its best_trial raises); `archsearch studies` says none is feasible, exit 0, no traceback."""
    study = optuna.create_study(study_name="all_capped", storage=f"sqlite:///{tmp_path / 'archsearch.db'}")
    t = study.ask({"num_layers": optuna.distributions.IntDistribution(1, 3)})
    t.set_user_attr("config_name", "a")
    t.set_constraint("capped", 1.0)
    study.tell(t, -0.5)
    out = cli("studies", "--storage", f"sqlite:///{tmp_path / 'archsearch.db'}", "--json", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "none feasible" in out.stdout
    row = json.loads((tmp_path / "s.json").read_text())[0]
    assert row["best"] == [] and row["best_note"] == "no feasible COMPLETE trial"


def test_a_missing_default_storage_is_named_as_the_default(tmp_path):
    """A newcomer's first `archsearch studies` (or report) before any run gave no
    --storage: the message says the default was looked for, and where, not '--storage ...'."""
    home = tmp_path / "home"
    for args in (["studies"], ["report"]):
        r = cli(*args, env={"ARCHSEARCH_HOME": str(home)})
        assert r.returncode == 2, (args, r.stderr)
        err = " ".join(r.stderr.split())
        assert f"error: the default storage sqlite:///{home / 'archsearch.db'} ($ARCHSEARCH_HOME/archsearch.db; --storage names another): " \
               "no such study storage (run a study first)" in err, err
        assert "Traceback" not in r.stderr
    assert not home.exists()


@pytest.mark.slow
def test_sigkill_of_the_driver_mid_trial_then_rerun_finishes_the_study(tmp_path):
    """Kill the driver while a trial trains; the same command again completes every config
    exactly once, fails the orphaned RUNNING trial and retries its config."""
    home = tmp_path / "home"
    env = dict(os.environ, ARCHSEARCH_HOME=str(home), PYTHONUNBUFFERED="1", ARCHSEARCH_GRACE_S="600")
    args = [sys.executable, "-m", "archsearch.cli", "run", "spaces/quickstart.yaml", "--quiet",
            "data.sizes={tokens: [1000, 2000, 4000]}", "data.val_tokens=500", "phase2.max_epochs=3", "max_concurrent=1"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    db = home / "archsearch.db"
    killed_number = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and killed_number is None:
            time.sleep(0.5)
            if not db.exists():
                continue
            try:
                trials = read_trials(db, "quickstart")
            except Exception:
                continue
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("sizes_done", 0) >= 1]
            if done and running:  # one trial finished, the next is mid-way
                killed_number = running[0].number
                os.kill(proc.pid, signal.SIGKILL)
        assert killed_number is not None, proc.stdout.read().decode()[-3000:]
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the orphaned embedded Ray of the killed driver
        except ProcessLookupError:
            pass
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{db}")
    assert study.trials[killed_number].state == TrialState.RUNNING  # what a killed run leaves

    r = cli("run", *args[4:], env={"ARCHSEARCH_HOME": str(home)}, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stale trial(s) of a killed run were failed and retried" in r.stdout
    trials = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{db}").get_trials()
    complete = [t.user_attrs["config_name"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(["baseline", "input_tokens_2", "context_dim_96", "layers_3"])  # none lost, none twice
    assert trials[killed_number].state == TrialState.FAIL
    assert "stale" in trials[killed_number].user_attrs["fail_reason"]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # the sizes the killed trial finished came from the run cache
    retried = next(t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["config_name"] == trials[killed_number].user_attrs["config_name"])
    assert retried.user_attrs["cache_hits"] >= 1
