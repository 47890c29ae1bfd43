"""ARCHSEARCH_RAY_WARM_WORKERS=1: the embedded Ray's workers import torch and the engine when
they start (a worker_process_setup_hook), and a search runs as without it."""

from __future__ import annotations

import json
import sqlite3

import pytest
from helpers import cli, tiny_space, write_space

from archsearch.search.runner import WARM_WORKERS_VAR, local_init_options


def test_the_hook_is_asked_for_only_with_the_variable(monkeypatch):
    monkeypatch.delenv(WARM_WORKERS_VAR, raising=False)
    assert "runtime_env" not in local_init_options()
    monkeypatch.setenv(WARM_WORKERS_VAR, "1")
    hook = local_init_options()["runtime_env"]["worker_process_setup_hook"]
    module, _, name = hook.rpartition(".")
    import importlib

    getattr(importlib.import_module(module), name)()  # Ray resolves and calls it so in each worker


def test_a_worker_without_the_hook_has_no_torch_before_its_trial():
    """What the slow test's check rests on: the trainable's module, Ray and Tune import no torch."""
    import subprocess
    import sys

    code = "import sys, archsearch.search.trainable, ray, ray.tune; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.slow
def test_a_search_with_warm_workers_runs_and_its_workers_had_torch_already(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, max_concurrent=1))
    r = cli("run", str(space), "--json", str(tmp_path / "r.json"), "--quiet", env={"ARCHSEARCH_HOME": str(home), WARM_WORKERS_VAR: "1"})
    assert r.returncode == 0, r.stderr
    assert [t["state"] for t in json.loads((tmp_path / "r.json").read_text())["trials"]] == ["COMPLETE", "COMPLETE"]
    with sqlite3.connect(home / "archsearch.db") as con:
        workers = [json.loads(v) for (v,) in con.execute("select value_json from trial_user_attributes where key = 'worker'")]
    # torch was in sys.modules when the trial began: the hook ran in the trial's worker
    assert workers and all(w["torch_before_trial"] for w in workers)
