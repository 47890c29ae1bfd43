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


def test_embedded_ray_listens_on_loopback_only(home):  # home: Ray's folder goes under it
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


# --------------------------------------------------------------------------- the dashboard's Host check


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, host_header: str | None, method: str = "GET", path: str = "/api/studies") -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        if host_header is not None:
            conn.putheader("Host", host_header)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def dashboard(tmp_path):
    """``archsearch dashboard`` serving a real SQLite storage with one study; a factory taking extra options."""
    import optuna

    db = tmp_path / "studies.db"
    optuna.create_study(study_name="kept", storage=f"sqlite:///{db}")
    procs = []

    def start(*options: str) -> int:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "archsearch.cli", "dashboard", "--storage", f"sqlite:///{db}", "--port", str(port), *options],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
        procs.append(proc)
        for _ in range(200):
            try:
                request(port, f"127.0.0.1:{port}")
                return port
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stdout.read().decode())
                time.sleep(0.1)
        raise AssertionError("the dashboard did not start")

    start.db = db
    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def test_dashboard_answers_only_requests_addressed_to_it(dashboard):
    import optuna

    port = dashboard()
    for good in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        status, body = request(port, good)
        assert status == 200 and b"kept" in body, good
    for forged in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"127.0.0.1:{port + 1}", "", None):
        status, body = request(port, forged)
        assert status == 403 and b"does not name this server" in body and b"kept" not in body, forged
    # the DNS-rebinding attack itself: a page on another site deleting a study
    sid = optuna.load_study(study_name="kept", storage=f"sqlite:///{dashboard.db}")._study_id
    assert request(port, f"rebind.evil.example:{port}", "DELETE", f"/api/studies/{sid}")[0] == 403
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{dashboard.db}")] == ["kept"]


def test_dashboard_answers_the_names_the_user_allows(dashboard):
    port = dashboard("--allow-host", "dash.example", "--allow-host", "other.example:9999")
    assert request(port, f"dash.example:{port}")[0] == 200
    assert request(port, "other.example:9999")[0] == 200  # e.g. behind a proxy on another port
    assert request(port, f"other.example:{port}")[0] == 403
    assert request(port, f"evil.example:{port}")[0] == 403
    port = dashboard("--any-host")
    assert request(port, f"evil.example:{port}")[0] == 200
