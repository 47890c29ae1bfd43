"""Nothing archsearch starts listens beyond this machine: the embedded Ray binds to the
loopback address, and the dashboard answers only requests addressed to where it serves."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time

import pytest
from helpers import ROOT, descendants, listening_sockets, read_trials, tiny_space, write_space
from optuna.trial import TrialState


def exposed(sockets):
    return [s for s in sockets if not ipaddress.ip_address(s[2]).is_loopback]


def test_embedded_ray_listens_on_loopback_only():
    import ray

    from archsearch.search.runner import init_ray

    init_ray(None)
    try:
        pid = ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process is up
        sockets = listening_sockets(descendants(os.getpid()))
        assert pid in descendants(os.getpid())
        assert {s[0] for s in sockets} - {os.getpid()}, "no Ray process listens at all: the check would be empty"
        assert not exposed(sockets), exposed(sockets)
        assert ray._private.worker.global_worker.node.node_ip_address == "127.0.0.1"
    finally:
        ray.shutdown()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # the switch is not left on for --address


@pytest.mark.slow
def test_a_run_listens_on_loopback_only(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, max_concurrent=1,
                                                        phase2={"batch_size": 16, "max_epochs": 30, "patience": 30}))  # fmt: skip
    env = dict(os.environ, ARCHSEARCH_HOME=str(home), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "archsearch.cli", "run", str(space), "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline, sockets = time.time() + 240, []
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                running = [t for t in read_trials(home / "archsearch.db", "tiny") if t.state == TrialState.RUNNING and t.user_attrs.get("worker_pid")]
            except Exception:
                continue
            if running:  # a trial is training in a Ray worker: every kind of Ray process is up
                sockets = listening_sockets(descendants(proc.pid))
                break
        assert sockets, "no trial reached a worker"
        pids = {s[0] for s in sockets}
        assert running[0].user_attrs["worker_pid"] in pids and len(pids) >= 4  # driver, GCS, raylet, worker at least
        assert not exposed(sockets), exposed(sockets)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
