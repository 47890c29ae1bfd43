"""A real 2-node Ray cluster on this machine (`ray start` twice): trials land on both nodes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from helpers import cli, tiny_space, write_space
from optuna.trial import TrialState

RAY = str(Path(sys.executable).parent / "ray")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp: Path) -> None:
    """Stop the Ray processes of the cluster whose temp folder is ``temp`` (their command
    lines name it), by pid: `ray stop` would stop every Ray of this user on the machine."""
    import signal

    from helpers import descendants

    def ours() -> list[int]:
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if str(temp).encode() in (entry / "cmdline").read_bytes() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
            except OSError:
                continue
        return sorted({d for p in found for d in descendants(p)})

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)


def ray_start(temp: Path, *args: str, env: dict) -> None:
    common = ["--num-cpus=1", "--object-store-memory=200000000", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    subprocess.run([RAY, "start", *args, *common], env=env, check=True, capture_output=True, timeout=180)


@pytest.fixture
def cluster(short_dir):
    """Head + one worker node, 1 CPU each, token authentication on (Ray's default)."""
    env = dict(os.environ, RAY_AUTH_MODE="token")
    port = _port()
    temp = short_dir / "r"
    try:
        ray_start(temp, "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", env=env)
        ray_start(temp, f"--address=127.0.0.1:{port}", env=env)  # a worker node uses the head's temp folder
        yield f"127.0.0.1:{port}", env
    finally:
        stop_cluster(temp)


@pytest.mark.slow
def test_study_on_a_two_node_cluster(tmp_path, tiny_corpus, cluster):
    address, env = cluster
    configs = {f"c{i}": {"num_layers": 1 + i % 2, "context_dim": 8 * (1 + i // 2)} for i in range(4)}
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, sampler={"type": "grid", "configs": configs},
                                                         max_concurrent=2, phase2={"batch_size": 32, "max_epochs": 6}))  # fmt: skip
    r = cli("run", str(space), "--address", address, "--quiet", env={"ARCHSEARCH_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": env["RAY_AUTH_MODE"]})
    assert r.returncode == 0, r.stdout + r.stderr
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'home' / 'archsearch.db'}").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    nodes = {t.user_attrs["ray_node"] for t in trials}
    assert len(nodes) == 2, nodes  # both nodes ran trials


def test_an_address_nothing_listens_on_is_a_usage_error_within_seconds_that_writes_nothing(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    address = f"127.0.0.1:{_port()}"  # bound a moment ago, free now: nothing listens there
    t = time.monotonic()
    r = cli("run", str(space), "--address", address, env={"ARCHSEARCH_HOME": str(home)}, timeout=120)
    took = time.monotonic() - t
    assert r.returncode == 2, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert f"--address {address}: no Ray cluster answers there" in err and "Traceback" not in r.stderr, err
    print(f"refused after {took:.1f} s")  # the command's own imports; Ray alone would retry for minutes (timeout above)
    left = sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) if home.exists() else []
    assert not [p for p in left if not p.startswith("data")], left  # no storage, no Ray folder: at most prepared data


@pytest.mark.slow
def test_a_run_on_a_cluster_started_with_ray_start(tiny_corpus, short_dir):
    """`ray start --head` as a user would (its own temp folder), then `archsearch run --address`."""
    port = _port()
    env = dict(os.environ, RAY_AUTH_MODE="token")
    temp = short_dir / "r"
    ray_start(temp, "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", env=env)
    try:
        # the cluster's sessions: its own (named after `ray start`'s pid, gone by now) and an old one
        sessions = [p for p in temp.glob("session_2*") if p.is_dir()] + [temp / "session_2000-01-01_00-00-00_000001_4194305"]
        sessions[-1].mkdir()
        home = short_dir / "h"
        space = write_space(short_dir / "s.yaml", tiny_space(tiny_corpus, sampler={"type": "grid", "configs": {"a": {"num_layers": 1, "context_dim": 8}}}))
        r = cli("run", str(space), "--address", f"127.0.0.1:{port}", "--quiet",
                env={"ARCHSEARCH_HOME": str(home), "RAY_AUTH_MODE": "token", "ARCHSEARCH_RAY_SESSIONS": "0"}, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'archsearch.db'}").get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE]
        assert trials[0].user_attrs["ray_node"]  # it ran on the cluster's node
        assert not (home / "ray").exists() or not list((home / "ray").glob("session_*"))  # the cluster's own folder is used
        assert len(sessions) == 2 and all(p.is_dir() for p in sessions)  # with --address nothing is pruned
    finally:
        stop_cluster(temp)


def test_an_address_where_something_else_listens_is_a_usage_error_that_writes_nothing(tmp_path, tiny_corpus):
    """A port that accepts and never answers (Ray alone would retry it for minutes)."""
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        r = cli("run", str(space), "--address", address, env={"ARCHSEARCH_HOME": str(home)}, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert f"--address {address}: something listens there, but not a Ray cluster (no gRPC answer within 5 s)" in err, err
    assert "Traceback" not in r.stderr
    left = sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) if home.exists() else []
    assert not [p for p in left if not p.startswith("data")], left
